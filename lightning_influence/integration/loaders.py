"""The callback's data from the Trainer: the training set it fitted and the queries' loader, checked with
messages that name the fix."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

from ..data import check_map_dataset
from ..errors import InfluenceConfigError

__all__ = ["check_query_range", "limited_batches_note", "no_queries_yet_note", "query_loader", "queries_may_come_later", "sampled_examples",
           "train_loader"]


def train_loader(trainer: Any) -> DataLoader:
    """The Trainer's training ``DataLoader`` over a map-style dataset."""
    loader = trainer.train_dataloader
    if loader is None:
        raise InfluenceConfigError(
            "InfluenceCallback found no train dataloader; pass train_dataloaders or a datamodule to trainer.fit."
        )
    if not isinstance(loader, DataLoader):
        raise InfluenceConfigError(
            f"the train dataloader is a {type(loader).__name__}; InfluenceCallback supports a single "
            "torch DataLoader over a map-style dataset. Wrap multiple sources into one Dataset."
        )
    check_map_dataset(loader.dataset, "training")
    return loader


def query_loader(trainer: Any, explicit: Optional[DataLoader], required: bool = True,
                 warn: Any = None) -> Optional[DataLoader]:
    """``explicit`` (the callback's ``query_dataloader``), else the Trainer's (first) validation loader;
    ``None`` when there is none and it is not ``required``."""
    if explicit is not None:
        return explicit
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        if len(loaders) > 1 and warn is not None:
            warn("InfluenceCallback takes queries from the first of several validation dataloaders.")
        loaders = loaders[0] if loaders else None
    if loaders is None:
        if required:
            raise InfluenceConfigError(
                "InfluenceCallback has no query data: the trainer ran no validation dataloader. Pass "
                "val_dataloaders to trainer.fit, or query_dataloader= to InfluenceCallback."
            )
        return None
    if not isinstance(loaders, DataLoader):
        raise InfluenceConfigError(
            f"the validation dataloader is a {type(loaders).__name__}; pass query_dataloader= (a torch DataLoader)."
        )
    return loaders


def no_queries_yet_note(trainer: Any, explicit: Optional[DataLoader], trigger: str, where: str) -> Optional[str]:
    """Why an in-loop run (``trigger`` ``"epoch"`` or ``"step"``, at ``where``) has no queries yet, and the fix;
    ``None`` when it has them (or never will: the run then fails with the loader's own message)."""
    if not queries_may_come_later(trainer, explicit):
        return None
    why = "check_val_every_n_epoch > 1" if trigger == "epoch" else "no validation has run yet"
    return (f"InfluenceCallback: no influence {where}: Lightning has not loaded the validation data yet ({why}); pass "
            f"query_dataloader= to have queries at every {'epoch' if trigger == 'epoch' else 'run'}.")


def queries_may_come_later(trainer: Any, explicit: Optional[DataLoader]) -> bool:
    """Whether a validation dataloader that is not there yet may still be set up before training ends
    (Lightning loads it at the first validation, e.g. with ``check_val_every_n_epoch > 1``). ``False``
    when validation cannot run at all."""
    if explicit is not None or trainer.val_dataloaders is not None:
        return False
    if not trainer.limit_val_batches:
        return False
    module = trainer.lightning_module
    if module is None or not _overrides(module, "validation_step"):
        return False
    source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
    is_defined = getattr(source, "is_defined", None)
    return bool(is_defined()) if callable(is_defined) else True


def _overrides(module: Any, method: str) -> bool:
    """Whether the LightningModule overrides ``method`` (either Lightning namespace)."""
    own = getattr(type(module), method, None)
    for base in type(module).__mro__:
        if base.__name__ == "LightningModule":
            return own is not getattr(base, method, None)
    return own is not None


def check_query_range(query_indices: Optional[Sequence[int]], loader: DataLoader) -> None:
    """Refuse ``query_indices`` beyond the query dataset, naming them and the valid range."""
    check_map_dataset(loader.dataset, "query")
    if query_indices is None:
        return
    n = len(loader.dataset)  # type: ignore[arg-type]
    bad = [i for i in query_indices if i >= n]
    if bad:
        raise InfluenceConfigError(
            f"query_indices {bad[:5]} are out of range for a query dataset of {n} examples (valid: 0..{n - 1})."
        )


def limited_batches_note(trainer: Any, loader: DataLoader, scored: Optional[int] = None) -> Optional[str]:
    """A line saying that training saw fewer batches than the loader holds (influence scores them all:
    ``scored`` examples, default the whole dataset), or ``None``."""
    used, total = trainer.num_training_batches, len(loader)
    if used < total:
        n = len(loader.dataset) if scored is None else scored  # type: ignore[arg-type]
        what = "the whole training dataset" if scored is None else "every example its sampler draws from"
        return (f"InfluenceCallback: training used {int(used)} of {total} batches per epoch "
                f"(limit_train_batches={trainer.limit_train_batches}); influence scores {what}, all {n} examples.")
    return None


def _user_sampler(loader: DataLoader) -> Any:
    """The sampler the user gave the loader: under DDP Lightning wraps it in a ``DistributedSamplerWrapper``
    (the original at ``.dataset._sampler``); a custom ``batch_sampler`` is returned as it is."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) if type(batch_sampler) is BatchSampler else batch_sampler
    if sampler is None:
        sampler = loader.sampler
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DistributedSamplerWrapper
    return inner if inner is not None else sampler


def sampled_examples(loader: DataLoader) -> Tuple[Optional[List[int]], Optional[str]]:
    """Which training examples the loader's sampler draws from: ``(positions, line)`` when it leaves some
    out and the set is known (``SubsetRandomSampler.indices``, the nonzero weights of a
    ``WeightedRandomSampler``), ``(None, warning)`` for a sampler that may leave examples out in a way this
    cannot see, ``(None, None)`` when every example is drawn (sequential, random, Lightning's distributed
    sampler). Influence then scores only those positions, so that an example never trained on is never
    ranked as a suspect."""
    sampler = _user_sampler(loader)
    n = len(loader.dataset)  # type: ignore[arg-type]
    name = type(sampler).__name__
    if isinstance(sampler, (SequentialSampler, RandomSampler)) or type(sampler) is DistributedSampler:
        return None, None
    if isinstance(sampler, SubsetRandomSampler):
        drawn = sorted({int(i) for i in sampler.indices})
        source = f"{name}.indices"
    elif isinstance(sampler, WeightedRandomSampler):
        weights = torch.as_tensor(sampler.weights, dtype=torch.double).reshape(-1)
        drawn = (weights > 0).nonzero().flatten().tolist() if weights.numel() == n else []
        source = f"the nonzero weights of {name}"
        if weights.numel() != n:
            return None, (f"InfluenceCallback: the training DataLoader's {name} has {weights.numel()} weights for a "
                          f"dataset of {n} examples; influence scores all {n}, including any that training never "
                          "draws. Give it one weight per example.")
    else:
        return None, (f"InfluenceCallback: the training DataLoader draws with {name}, which may leave examples out; "
                      f"influence scores all {n} examples of the dataset, so an example training never drew can "
                      "rank as a suspect. Use SubsetRandomSampler(indices) (or a Subset of the dataset) to train "
                      "on part of it, or compute_influence(..., train_indices=...).")
    if len(drawn) == n and drawn == list(range(n)):
        return None, None
    return drawn, (f"InfluenceCallback: training draws from {len(drawn)} of the {n} examples of the dataset "
                   f"({source}); influence scores only those (results.train_indices are their dataset positions).")
