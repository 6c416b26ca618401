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

**Two groups** (:func:`group_scales`, K-FAC/EK-FAC with parameters outside the Kronecker layers: LayerNorms,
BatchNorms, positions, recurrent weights, embedding bags): those parameters get the Fisher diagonal (or a dense
block), a much cruder direction than the factored layers', and one scalar cannot size both. Split
``x = x_K + x_D`` by group (the inverse is block diagonal, so each part is its group's own solution) and take the
Galerkin solution in the two-dimensional space they span:

    [x_Kᵀ(H+λI)x_K  x_Kᵀ(H+λI)x_D] [α_K]   [x_Kᵀv]
    [x_Dᵀ(H+λI)x_K  x_Dᵀ(H+λI)x_D] [α_D] = [x_Dᵀv]      (sums over the probes),

the ``α_K x_K + α_D x_D`` nearest ``(H + λI)⁻¹v`` in the ``(H + λI)``-norm. A group whose coefficient comes out
``≤ 0`` (its direction points away from the Hessian solve) is **excluded**: scale 0, the other group's scale
refitted alone by the one-group rule, and a diagnostic naming the excluded parameters and their share. Measured
against CG (median per-query Pearson, ``benchmarks/README.md``), one scale → two: the benchmark transformer
classifier 0.789 → 0.841 (its LayerNorms and positions scaled down), the zoo LSTM 0.586 → 0.703, GRU 0.498 →
0.618, RNN 0.316 → 0.487 (their recurrent weights excluded or nearly so), ResNet block 0.699 → 0.733, EmbeddingBag
model 0.937 → 0.971, BatchNorm CNN 0.801 → 0.805, causal LM and benchmark LM unchanged (0.714, 0.851); the zoo's
tiny transformer 0.612 → 0.561. Cost: the same 16 right-hand sides as one group: 8 probes, each split into its
two parts (against 16 probes: Pearson within 0.0005 on the benchmark transformers and the same groups excluded on
the zoo; α moves less between 8 and 16 probes than between the probes' seeds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..diagnostics import Diagnostic
from ..seeds import Stream, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["CALIBRATION_EXAMPLES", "CALIBRATION_TANGENTS", "group_scales", "magnitude_scale"]

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
    why = _unmeasurable(problem)
    if why:
        return 1.0, _record(1.0, None, 0, why)
    v, x = _probes(problem, inverse, probes, seed)
    hx = _damped_hvp(problem, inverse, x, seed)
    return _one_group(v, x, hx)


def group_scales(problem: "InfluenceProblem", inverse: Any, rest: Tensor, probes: int = 16, seed: int = 0,
                 rest_names: Sequence[str] = (), rest_share: float = 0.0) -> Tuple[float, float, List[Diagnostic]]:
    """``(α_K, α_D, diagnostics)``: the two-group rule of the module docstring, with ``rest`` the flat
    coordinates (long) of the second group (an empty ``rest``: :func:`magnitude_scale`, both scales equal).
    ``probes`` counts right-hand sides of the HVP: two groups take ``probes // 2`` training gradients (at least
    4), each split in two. ``rest_names``/``rest_share`` name the group and its share of the parameters in the
    diagnostics."""
    if rest.numel() == 0:
        alpha, found = magnitude_scale(problem, inverse, probes, seed)
        return alpha, alpha, found
    why = _unmeasurable(problem)
    if why:
        return 1.0, 1.0, _record(1.0, None, 0, why)
    v, x = _probes(problem, inverse, max(int(probes) // 2, 4), seed)
    x_rest = torch.zeros_like(x)
    x_rest[:, rest] = x[:, rest]
    x_fact = x - x_rest
    h = _damped_hvp(problem, inverse, torch.cat([x_fact, x_rest]), seed)
    h_fact, h_rest = h[: x.shape[0]], h[x.shape[0] :]

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(dim=1).double()

    terms = torch.stack([dot(x_fact, h_fact), dot(x_fact, h_rest), dot(x_rest, h_rest), dot(x_fact, v),
                         dot(x_rest, v)])
    fin = terms.isfinite().all(dim=0)  # the probes whose five products are all finite, summed over
    g_ff, g_fr, g_rr, b_f, b_r = terms[:, fin].sum(dim=1)
    gram = torch.stack([torch.stack([g_ff, g_fr]), torch.stack([g_fr, g_rr])])
    usable = bool(fin.any()) and float(g_ff) > 0 and float(torch.linalg.det(gram)) > 0
    coef = torch.linalg.solve(gram, torch.stack([b_f, b_r])) if usable else None
    names = ", ".join(rest_names) or "the parameters outside the Kronecker layers"
    share = f"{100 * rest_share:.1f}% of the attributed parameters"
    if coef is not None and bool((coef > 0).all()) and bool(coef.isfinite().all()):
        a_f, a_r = float(coef[0]), float(coef[1])
        found = _record(a_f, None, x.shape[0], "")
        found.append(_rest_record(a_r, f"α of {names} ({share}), fitted jointly with the Kronecker layers' α"))
        return a_f, a_r, found
    # a group along which the fit is ≤ 0 is excluded; the other keeps the one-group rule on its own part
    if coef is not None and float(coef[0]) > 0 >= float(coef[1]):
        a_f, found = _one_group(v, x_fact, h_fact)
        if not _failed(found):
            found.append(_rest_record(0.0, f"excluded: {names} ({share}) contribute nothing to the scores (their "
                                           f"joint Galerkin coefficient {float(coef[1]):.3g} ≤ 0: the diagonal "
                                           "Fisher direction points away from the Hessian solve)"))
            return a_f, 0.0, found
    if coef is not None and float(coef[1]) > 0 >= float(coef[0]):
        a_r, found = _one_group(v, x_rest, h_rest)
        if not _failed(found):
            found = _record(0.0, None, x.shape[0], "")
            found.append(_rest_record(a_r, f"α of {names} ({share}); the Kronecker layers are excluded (their "
                                           f"joint Galerkin coefficient {float(coef[0]):.3g} ≤ 0)"))
            return 0.0, a_r, found
    alpha, found = _one_group(v, x, h_fact + h_rest)  # no usable joint fit: one scale for both
    found.append(_rest_record(alpha, "one α for both groups (the two-group system was not positive definite)"))
    return alpha, alpha, found


def _unmeasurable(problem: "InfluenceProblem") -> str:
    plan = problem.objective.differentiation
    if plan.hvp is None or not plan.exact:
        why = ("the model has no exact Hessian-vector products" if plan.hvp is not None
               else "Hessian-vector products were not probed for this model")
        return f"not calibrated: {why}"
    return ""


def _probes(problem: "InfluenceProblem", inverse: Any, probes: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``(v, x)``: the probes' training gradients and the unscaled inverse applied to them."""
    n = problem.num_examples
    k = min(int(probes), n)
    gen = torch.Generator().manual_seed(derive_seed(seed, Stream.SUBSAMPLE) + 1)
    pick = torch.randperm(n, generator=gen)[:k].sort().values
    source = problem.train.subset(pick)
    v = torch.cat([problem.example_grads(batch) for _, batch in source.chunks(problem.chunk_size)])
    return v, inverse.apply(v)


def _damped_hvp(problem: "InfluenceProblem", inverse: Any, x: Tensor, seed: int) -> Tensor:
    seen = problem.subsample(CALIBRATION_EXAMPLES, seed)
    op = seen.operator  # a scalar needs no more than a subset's Hessian; few tangents at a time bound the memory
    op.tangent_chunk = CALIBRATION_TANGENTS
    return op.full_hvp(x) + inverse.damping * x


def _one_group(v: Tensor, x: Tensor, hx: Tensor) -> Tuple[float, List[Diagnostic]]:
    """The median of the per-probe ratios ``xᵀv / xᵀ(H + λI)x`` over the probes where both are positive."""
    k = x.shape[0]
    num = (x * v).sum(dim=1).double()
    den = (x * hx).sum(dim=1).double()
    ok = (num > 0) & (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    if int(ok.sum()) * 2 < k:
        return 1.0, _record(1.0, None, int(ok.sum()), f"not calibrated: only {int(ok.sum())} of {k} probes had "
                                                       "positive curvature xᵀ(H + λI)x")
    ratios = num[ok] / den[ok]
    alpha = float(ratios.median())
    return alpha, _record(alpha, ratios, k, "")


def _failed(found: Sequence[Diagnostic]) -> bool:
    return any(d.name == "magnitude_scale_note" for d in found)


def _rest_record(alpha: float, what: str) -> Diagnostic:
    return Diagnostic("magnitude_scale_rest", alpha, "magnitude scale α of the diagonal group",
                      f"the diagonal (and dense-block) parameters' inverse is scaled by it: {what}")


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
