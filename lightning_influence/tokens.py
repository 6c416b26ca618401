"""Per-token query gradients: a sequence's loss split into its token terms, each a right-hand side of its own.

A language model's query loss is a sum over its target positions, ``L(z_q) = Σ_t L_t(z_q)`` (the default loss
on ``[B, T, V]`` logits with ``[B, T]`` targets: the token cross-entropies, :data:`~.objective.IGNORE_INDEX`
positions left out). The per-token influence of training example ``z_i`` on token ``t`` is
``−∇L_t(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)``; by linearity the token scores of a query sum to its sequence score.

The rule for the token terms (no new loss contract): ``L_t`` is the loss of the same example with every
target but position ``t`` set to ``IGNORE_INDEX`` (``−100``). That is exact for the default loss, and for any
``loss_fn(outputs, targets)`` that adds up per-position losses (a sum, or a mean over a fixed length) and
ignores ``−100`` (``F.cross_entropy``'s default ``ignore_index``, as ``tests.zoo.lm_sequence_loss``);
:func:`check_token_losses` checks it on the first queries (the token losses must add up to the sequence
loss) and otherwise raises naming the fix. The
``influence_loss`` hook path has no targets this rule can mask and is refused with the fix.

Positions are flat indices into an example's targets (``targets[q].reshape(-1)``; for ``[T]`` targets the
token's position ``t``). Positions whose target is ``−100`` (padding, a prompt) have no token term and get
no row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .errors import InfluenceConfigError
from .functional import map_tensors
from .objective import HOOK_NAME, IGNORE_INDEX, Objective
from .scoring import checked_grads

__all__ = ["QueryTokens", "check_per_token", "check_token_losses", "concat_tokens", "expand_tokens", "token_gradients",
           "token_positions"]

#: relative tolerance of :func:`check_token_losses` (float32 sums of a few hundred token terms)
TOKEN_SUM_RTOL = 1e-4


@dataclass(frozen=True)
class QueryTokens:
    """The token terms of the queries: row ``r`` is position ``positions[r]`` of query row ``rows[r]``.

    Attributes:
        grads: ``∇L_t(z_q)`` ``[R, P]``.
        rows: ``[R]`` the query's row of the scores (``0..Q-1``), ascending.
        positions: ``[R]`` flat position in the query's targets.
        targets: ``[R]`` the target token id at that position (what the model predicts there).
    """

    grads: Tensor
    rows: Tensor
    positions: Tensor
    targets: Tensor


def check_per_token(objective: Objective, batch: Any = None) -> None:
    """Raise :class:`~.errors.InfluenceConfigError` naming the fix when ``per_token=True`` cannot be served:
    the ``influence_loss`` hook path, or targets that are not integer token ids ``[B, T, …]`` (with
    ``batch``, a prepared query batch)."""
    if objective.uses_hook:
        raise InfluenceConfigError(
            f"per_token=True needs (inputs, targets) batches whose loss sums token losses, but "
            f"{type(objective.module).__name__} defines {HOOK_NAME}(batch), whose token terms cannot be told "
            f"apart. Remove {HOOK_NAME} and pass loss_fn= (or use the default cross-entropy on [B, T, V] logits "
            "with [B, T] targets), or pass per_token=False."
        )
    if batch is None:
        return
    targets = batch[1]
    if not isinstance(targets, Tensor) or targets.dim() < 2 or targets.is_floating_point() or targets.dtype == torch.bool:
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, Tensor) else type(targets).__name__
        raise InfluenceConfigError(
            f"per_token=True needs integer token targets [B, T] (a language model's next tokens, {IGNORE_INDEX} for "
            f"padding); the query batch's targets are {got}. Pass per_token=False for one score per example."
        )


def token_positions(targets: Tensor) -> Tuple[Tensor, Tensor]:
    """``(rows, positions)`` of every target that is not :data:`~.objective.IGNORE_INDEX`, in row-major
    order: ``targets [B, T, …]`` read as ``[B, T·…]``."""
    flat = targets.reshape(targets.shape[0], -1)
    rows, positions = (flat != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, positions


def expand_tokens(batch: Any, rows: Tensor, positions: Tensor) -> Any:
    """A batch of ``len(rows)`` examples: example ``rows[r]`` of ``batch`` with every target but
    ``positions[r]`` set to ``IGNORE_INDEX``. Tensors of the batch with its leading size are indexed by
    ``rows``; other items are kept."""
    targets = batch[1]
    b = targets.shape[0]
    flat = targets.reshape(b, -1)
    masked = torch.full((rows.numel(), flat.shape[1]), IGNORE_INDEX, dtype=flat.dtype, device=flat.device)
    masked[torch.arange(rows.numel(), device=flat.device), positions] = flat[rows, positions]

    def pick(item: Any) -> Any:  # every tensor with the batch's leading size, however nested
        return map_tensors(item, lambda t: t.index_select(0, rows.to(t.device)) if t.dim() and t.shape[0] == b else t)

    return (pick(batch[0]), masked.view(rows.numel(), *targets.shape[1:]), *(pick(x) for x in batch[2:]))


def _masked_chunks(batch: Any, rows: Tensor, positions: Tensor, chunk_size: int) -> Iterator[Tuple[Tensor, Any]]:
    """``(rows of the chunk, its masked batch)`` for the token terms ``rows``/``positions``, ``chunk_size`` at a
    time (:func:`expand_tokens`)."""
    for s in range(0, rows.numel(), chunk_size):
        yield rows[s : s + chunk_size], expand_tokens(batch, rows[s : s + chunk_size], positions[s : s + chunk_size])


def check_token_losses(objective: Objective, batch: Any, rows: Tensor, positions: Tensor, indices: List[int],
                       chunk_size: int) -> None:
    """The rule of this module on one query batch: the losses of the masked copies (:func:`expand_tokens`,
    ``chunk_size`` at a time) add up, per query, to the query's loss. Raises naming the first query that
    disagrees and the fix."""
    seq = objective.losses(batch).double()
    summed = torch.zeros_like(seq)
    for part_rows, part in _masked_chunks(batch, rows, positions, chunk_size):
        summed.index_add_(0, part_rows.to(seq.device), objective.losses(part).double())
    bad = (summed - seq).abs() > TOKEN_SUM_RTOL * seq.abs().clamp(min=1.0)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise InfluenceConfigError(
            f"per_token=True: the token losses of query example {indices[j]} add up to {float(summed[j]):.6g}, not to "
            f"its loss {float(seq[j]):.6g}. A token's loss is the example's loss with every other target set to "
            f"{IGNORE_INDEX}, so loss_fn must sum per-position losses and ignore {IGNORE_INDEX} targets (as "
            f"F.cross_entropy(..., ignore_index={IGNORE_INDEX}, reduction='none') summed over positions, or the "
            "default loss). Fix loss_fn, or pass per_token=False."
        )


def token_gradients(objective: Objective, batch: Any, first_row: int, indices: List[int], chunk_size: int,
                    check: bool = False) -> Optional[QueryTokens]:
    """The token terms of one prepared query batch (its first example is query row ``first_row``; ``indices``
    its dataset positions): gradients of the masked copies, ``chunk_size`` at a time, by the objective's
    differentiation. ``check`` runs :func:`check_token_losses` first. ``None`` when no target is a token."""
    check_per_token(objective, batch)
    rows, positions = token_positions(batch[1])
    if rows.numel() == 0:
        return None
    if check:
        check_token_losses(objective, batch, rows, positions, indices, chunk_size)
    grads = []
    for part_rows, part in _masked_chunks(batch, rows, positions, chunk_size):
        grads.append(checked_grads(objective.loss, objective.space, objective.theta, part, "query token", 0,
                                   indices=torch.as_tensor(indices)[part_rows.cpu()], plan=objective.differentiation))
    flat = batch[1].reshape(batch[1].shape[0], -1)
    return QueryTokens(grads=torch.cat(grads), rows=(rows + first_row).cpu(), positions=positions.cpu(),
                       targets=flat[rows, positions].cpu())


def concat_tokens(parts: List[QueryTokens]) -> Optional[QueryTokens]:
    """The token terms of several query batches, in order; ``None`` when none has any."""
    if not parts:
        return None
    return QueryTokens(grads=torch.cat([p.grads for p in parts]), rows=torch.cat([p.rows for p in parts]),
                       positions=torch.cat([p.positions for p in parts]), targets=torch.cat([p.targets for p in parts]))
