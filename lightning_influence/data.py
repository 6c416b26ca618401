"""Index-stable access to a map-style dataset: sequential chunks for scoring, random minibatches for
stochastic solvers. Index ``i`` always means position ``i`` of the dataset, whatever order training used.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from .errors import InfluenceConfigError

__all__ = ["ExampleSource", "check_map_dataset"]

Collate = Callable[[Sequence[Any]], Any]


def check_map_dataset(dataset: Any, what: str) -> int:
    """Return ``len(dataset)`` or raise a clear error if it is not a sized, indexable dataset."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise InfluenceConfigError(
            f"the {what} dataset is {type(dataset).__name__}, an iterable-only dataset; influence needs "
            "stable example indices. Use a map-style Dataset (with __len__ and __getitem__)."
        )
    try:
        n = len(dataset)
    except TypeError as err:
        raise InfluenceConfigError(
            f"the {what} dataset {type(dataset).__name__} has no __len__; influence needs a sized, "
            "map-style Dataset."
        ) from err
    if n == 0:
        raise InfluenceConfigError(f"the {what} dataset is empty.")
    return int(n)


class ExampleSource:
    """A map-style dataset with its collate function and a ``prepare`` step (device, dtype).

    Args:
        dataset: map-style dataset; index ``i`` is example ``i`` everywhere in the results.
        collate_fn: how a list of examples becomes a batch (default: PyTorch's ``default_collate``).
        prepare: applied to every collated batch (move to device, cast) before the maths sees it.
        indices: optional subset of dataset positions, in this order.
        allow_empty: accept an empty ``indices`` (a process's shard when there are more processes than
            examples).
    """

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Optional[Collate] = None,
        prepare: Optional[Callable[[Any], Any]] = None,
        indices: Optional[Sequence[int]] = None,
        what: str = "training",
        allow_empty: bool = False,
    ) -> None:
        n = check_map_dataset(dataset, what)
        self.dataset = dataset
        self.collate_fn: Collate = collate_fn or default_collate
        self.prepare = prepare or (lambda b: b)
        self.what = what
        if indices is None:
            self.indices = torch.arange(n)
        else:
            self.indices = torch.as_tensor(list(indices), dtype=torch.long).reshape(-1)
            if self.indices.numel() == 0 and not allow_empty:
                raise InfluenceConfigError(f"no {what} indices were given.")
            bad = self.indices[(self.indices < 0) | (self.indices >= n)]
            if bad.numel():
                raise InfluenceConfigError(
                    f"{what} indices {bad[:5].tolist()} are out of range for a dataset of {n} examples "
                    f"(valid: 0..{n - 1})."
                )

    def __len__(self) -> int:
        return int(self.indices.numel())

    def subset(self, positions: Union[torch.Tensor, Sequence[int]], allow_empty: bool = False) -> "ExampleSource":
        """The same examples source restricted to ``positions`` (positions into ``self.indices``, in that
        order): its indices are still dataset indices."""
        picked = self.indices[torch.as_tensor(positions, dtype=torch.long)].tolist()
        return ExampleSource(self.dataset, self.collate_fn, self.prepare, indices=picked, what=self.what,
                             allow_empty=allow_empty)

    def batch(self, positions: torch.Tensor) -> Any:
        """Collate and prepare the examples at ``positions`` (positions into ``self.indices``)."""
        idx = self.indices[positions].tolist()
        return self.prepare(self.collate_fn([self.dataset[i] for i in idx]))

    def chunks(self, chunk_size: int) -> Iterator[Tuple[int, Any]]:
        """Sequential ``(start, batch)`` pairs covering every example once, in order."""
        loader = DataLoader(
            _Subset(self.dataset, self.indices.tolist()),
            batch_size=chunk_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=0,
        )
        start = 0
        for raw in loader:
            batch = self.prepare(raw)
            yield start, batch
            start += chunk_size

    def minibatches(self, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
        """An endless stream of random minibatches: epochs of a random permutation, without replacement
        inside an epoch. The stream depends only on ``generator``'s seed."""
        n = len(self)
        batch_size = min(batch_size, n)
        while True:
            perm = torch.randperm(n, generator=generator)
            for s in range(0, n - batch_size + 1, batch_size):
                yield self.batch(perm[s : s + batch_size])


class _Subset(Dataset):
    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]
