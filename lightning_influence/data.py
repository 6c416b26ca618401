"""Index-stable access to a map-style dataset: sequential chunks for scoring, random minibatches for
stochastic solvers. Index ``i`` always means position ``i`` of the dataset, whatever order training used.

A solver sweeps the training set many times (Lanczos, CG, the factor passes), so collating the same
examples on every pass would dominate the cost of small models. The first full pass keeps the prepared
chunks while they fit :data:`CACHE_BYTES`; with PyTorch's ``default_collate`` they are concatenated into
one prepared batch of the whole set, from which every later chunk and every random minibatch is a slice or
an index (exactly what collating those examples gives). A custom ``collate_fn`` keeps its chunks per chunk
size instead (its batches, e.g. padded to their longest example, are not slices of one batch).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from .errors import InfluenceConfigError
from .functional import batch_size_of, map_tensors

__all__ = ["CACHE_BYTES", "ExampleSource", "check_map_dataset"]

#: prepared examples kept between passes over one source (bytes of their tensors)
CACHE_BYTES = 512 * 2**20

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
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        n = check_map_dataset(dataset, what)
        self.cache_bytes = int(cache_bytes)
        #: the whole source as one prepared batch (default collate, once a full pass built it), or None
        self._stack: Optional[Any] = None
        self._chunk_cache: Dict[int, List[Any]] = {}
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
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        picked = self.indices[pos].tolist()
        out = ExampleSource(self.dataset, self.collate_fn, self.prepare, indices=picked, what=self.what,
                            allow_empty=allow_empty, cache_bytes=self.cache_bytes)
        if self._stack is not None and pos.numel():
            out._stack = self._slice(pos)
        return out

    def _slice(self, positions: Union[slice, torch.Tensor]) -> Any:
        stack = self._stack
        if isinstance(positions, torch.Tensor):
            positions = positions.to(_first_tensor(stack).device)
        return map_tensors(stack, lambda t: t[positions])

    def batch(self, positions: torch.Tensor) -> Any:
        """Collate and prepare the examples at ``positions`` (positions into ``self.indices``)."""
        if self._stack is not None:
            return self._slice(torch.as_tensor(positions, dtype=torch.long))
        idx = self.indices[positions].tolist()
        return self.prepare(self.collate_fn([self.dataset[i] for i in idx]))

    def chunks(self, chunk_size: int) -> Iterator[Tuple[int, Any]]:
        """Sequential ``(start, batch)`` pairs covering every example once, in order (from the cache after
        the first full pass, see the module docstring)."""
        n = len(self)
        if self._stack is not None:
            for start in range(0, n, chunk_size):
                yield start, self._slice(slice(start, min(start + chunk_size, n)))
            return
        if chunk_size in self._chunk_cache:
            for k, batch in enumerate(self._chunk_cache[chunk_size]):
                yield k * chunk_size, batch
            return
        loader = DataLoader(
            _Subset(self.dataset, self.indices.tolist()),
            batch_size=chunk_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=0,
        )
        kept: Optional[List[Any]] = [] if self.cache_bytes > 0 else None
        used = 0
        start = 0
        for raw in loader:
            batch = self.prepare(raw)
            if kept is not None:
                used += _tensor_bytes(batch)
                kept = kept + [batch] if used <= self.cache_bytes else None
            yield start, batch
            start += chunk_size
        if kept is not None and start >= n:  # a complete pass that fits
            self._keep(kept, chunk_size)

    def _keep(self, batches: List[Any], chunk_size: int) -> None:
        """Keep a complete pass: one stacked batch when the collate is PyTorch's default and every leaf is a
        tensor with one row per example, else the chunks themselves."""
        if self.collate_fn is default_collate and batches:
            try:
                stack = _concat(batches)
            except (RuntimeError, TypeError, ValueError):
                stack = None
            if stack is not None and batch_size_of(stack) == len(self) and _all_tensor_leaves(stack, len(self)):
                self._stack, self._chunk_cache = stack, {}
                return
        self._chunk_cache[chunk_size] = batches

    def minibatches(self, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
        """An endless stream of random minibatches: epochs of a random permutation, without replacement
        inside an epoch. The stream depends only on ``generator``'s seed."""
        n = len(self)
        batch_size = min(batch_size, n)
        while True:
            perm = torch.randperm(n, generator=generator)
            for s in range(0, n - batch_size + 1, batch_size):
                yield self.batch(perm[s : s + batch_size])


def _first_tensor(tree: Any) -> torch.Tensor:
    found: List[torch.Tensor] = []
    map_tensors(tree, lambda t: found.append(t))
    return found[0]


def _tensor_bytes(tree: Any) -> int:
    total = [0]

    def add(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    map_tensors(tree, add)
    return total[0]


def _all_tensor_leaves(tree: Any, n: int) -> bool:
    """Whether every leaf of a (nested) batch is a tensor with ``n`` rows."""
    if isinstance(tree, torch.Tensor):
        return tree.dim() > 0 and tree.shape[0] == n
    if isinstance(tree, (list, tuple)):
        return all(_all_tensor_leaves(t, n) for t in tree)
    if isinstance(tree, dict):
        return all(_all_tensor_leaves(t, n) for t in tree.values())
    return False


def _concat(batches: List[Any]) -> Any:
    """Concatenate batches of the same structure leaf by leaf along the first dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([b[k] for b in batches]) for k in first}
    raise TypeError(f"cannot concatenate batch leaves of type {type(first).__name__}")


class _Subset(Dataset):
    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]
