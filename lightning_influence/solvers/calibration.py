"""Magnitude calibration of a factored inverse: the scalar that gives ``(Ĥ + λI)⁻¹`` the size of ``(H + λI)⁻¹``.

A Fisher approximation ``Ĥ`` (K-FAC, EK-FAC) gets the direction of an inverse-HVP roughly right and its size
wrong: on the zoo (``benchmarks/bench_zoo.py``, damping as the Hessian solvers') EK-FAC's scores were 2-4× too
large on the MLPs and CNN and 8-37× on the transformer, the language model, the recurrent models and the
regression MLP (empirical Fisher), so a report predicted loss changes no user could believe. Raising ``λ``
shrinks them but loses the ranking (the tanh MLP's Pearson against CG fell from 0.89 to 0.66 at 100 × λ, with
magnitudes still 0.4-10× off across the zoo).

For ``x = (Ĥ + λI)⁻¹ v`` the scalar that minimises the ``(H + λI)``-norm error ``‖α x − (H + λI)⁻¹ v‖`` is

    α = xᵀv / xᵀ(H + λI)x        (one Galerkin step along x; α = 1 when Ĥ = H),

so the calibrated inverse is ``α (Ĥ + λI)⁻¹``: the same ranking (a positive scalar), the size of the Hessian
solve. ``α`` is estimated once, when the solver is fitted, on ``probes`` (16) probe vectors: the loss
gradients of that many training examples drawn with the solver's seed; the estimate is the median of the
per-probe ratios over the probes with ``xᵀv > 0`` and ``xᵀ(H + λI)x > 0`` (a probe along negative curvature
says nothing about size). Cost: the probes' gradients and one Hessian-vector product with ``probes``
right-hand sides over at most :data:`CALIBRATION_EXAMPLES` (256) training examples, :data:`CALIBRATION_TANGENTS`
(4) of them vmapped at a time. It needs exact Hessian-vector products; a model with none (finite differences
only) keeps ``α = 1``, and the diagnostics say why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

from ..diagnostics import Diagnostic
from ..seeds import Stream, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["CALIBRATION_EXAMPLES", "CALIBRATION_TANGENTS", "magnitude_scale"]

#: training examples (drawn with the solver's seed) whose mean-loss Hessian the probes are multiplied by. Measured
#: (α at 256 / 128 against 1,024 examples): within 4% / 34% on the zoo (the BatchNorm CNN the worst at 128), within
#: 2-7% / 4-6% on the benchmark transformers, where 1,024 examples cost 2.9 s of EK-FAC's 5.1 s and 256 cost 0.9 s
CALIBRATION_EXAMPLES = 256
#: probe vectors vmapped together in that product (its activations' memory grows with them)
CALIBRATION_TANGENTS = 4


def magnitude_scale(problem: "InfluenceProblem", inverse: Any, probes: int = 16,
                    seed: int = 0) -> Tuple[float, List[Diagnostic]]:
    """``(α, diagnostics)`` for ``inverse`` (a closed-form inverse: ``apply(V)`` and ``damping``, applied
    unscaled) on ``problem`` at its damping: the module docstring's estimate, or ``1.0`` with the reason in
    ``magnitude_scale_note`` when it cannot be measured. Every process draws the same probes and the same
    subset (positions in the whole training set), so the product all-reduces over identical vectors."""
    plan = problem.objective.differentiation
    if plan.hvp is None or not plan.exact:
        why = ("the model has no exact Hessian-vector products" if plan.hvp is not None
               else "Hessian-vector products were not probed for this model")
        return 1.0, _record(1.0, None, 0, f"not calibrated: {why}")
    n = problem.num_examples
    k = min(int(probes), n)
    gen = torch.Generator().manual_seed(derive_seed(seed, Stream.SUBSAMPLE) + 1)
    pick = torch.randperm(n, generator=gen)[:k].sort().values
    source = problem.train.subset(pick)
    v = torch.cat([problem.example_grads(batch) for _, batch in source.chunks(problem.chunk_size)])
    x = inverse.apply(v)
    seen = problem.subsample(CALIBRATION_EXAMPLES, seed)
    op = seen.operator  # a scalar needs no more than a subset's Hessian; few tangents at a time bound the memory
    op.tangent_chunk = CALIBRATION_TANGENTS
    hx = op.full_hvp(x) + inverse.damping * x
    num = (x * v).sum(dim=1).double()
    den = (x * hx).sum(dim=1).double()
    ok = (num > 0) & (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    if int(ok.sum()) * 2 < k:
        return 1.0, _record(1.0, None, int(ok.sum()), f"not calibrated: only {int(ok.sum())} of {k} probes had "
                                                       "positive curvature xᵀ(H + λI)x")
    ratios = num[ok] / den[ok]
    alpha = float(ratios.median())
    return alpha, _record(alpha, ratios, k, "")


def _record(alpha: float, ratios: Optional[torch.Tensor], probes: int, note: str) -> List[Diagnostic]:
    out = [Diagnostic("magnitude_scale", alpha, "magnitude scale α",
                      "the factored inverse is α(Ĥ + λI)⁻¹, α = median xᵀv / xᵀ(H + λI)x over training-gradient "
                      "probes (1: not calibrated); α < 1 means the uncalibrated scores were too large by 1/α"),
           Diagnostic("magnitude_probes", probes, "calibration probes", "training gradients α was measured on")]
    if ratios is not None and ratios.numel():
        out.append(Diagnostic("magnitude_scale_range", f"{float(ratios.min()):.3g}–{float(ratios.max()):.3g}",
                              "α over the probes", "smallest and largest per-probe ratio"))
    if note:
        out.append(Diagnostic("magnitude_scale_note", note, "calibration", "why α = 1"))
    return out
