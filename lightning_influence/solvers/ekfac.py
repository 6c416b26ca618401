"""K-FAC and EK-FAC: the Fisher of the mean training loss in Kronecker-factored eigenbases.

Per Kronecker layer (see :mod:`lightning_influence.solvers.kronecker` for the factors ``A``, ``S`` and their
scaling), with ``A = Q_A diag(d_A) Q_Aᵀ`` and ``S = Q_S diag(d_S) Q_Sᵀ``, the curvature block is

    Ĥ_layer = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ,

* K-FAC (Martens & Grosse, 2015; KFC for convolutions): ``Λ[o, i] = d_S[o] · d_A[i]``, i.e. ``S ⊗ A``;
* EK-FAC (George et al., 2018; Grosse et al., 2023): ``Λ[o, i] = (1/n) Σ_m E_y[(Q_Sᵀ G_m Q_A)²_{oi}]``,
  the Fisher's exact diagonal in that eigenbasis (``G_m`` example ``m``'s layer gradient), estimated in a
  second pass with fresh draws from the predictive distribution.

Layers are independent blocks (block-diagonal across layers); parameters outside layers with an adapter
(Linear, Conv1d/Conv2d, Embedding, MultiheadAttention, …) get their mean squared Fisher gradient (the
corrected eigenvalues in the identity basis), reported as ``diagonal_params``, with ``kronecker_coverage``
the factored fraction. Then

    (Ĥ + λI)⁻¹ V:   rotate each layer block ``V [Q, out, in']`` to ``Q_Sᵀ V Q_A``, divide by ``Λ + λ``,
    rotate back; ``(Ĥ + λI)^{-1/2}`` divides by ``√(Λ + λ)``;
    ``gᵀ(Ĥ + λI)⁻¹g = Σ (Q_Sᵀ G Q_A)²/(Λ + λ)``.

The Fisher is the Gauss–Newton matrix for cross-entropy (and other canonical-link losses), a positive
semi-definite stand-in for the Hessian ``H``; ``λ`` is in the Hessian units of the mean loss like every
solver's. Influence scores keep Koh & Liang's sign: ``I(z_i, z_q) = −∇ℓ_qᵀ (Ĥ + λI)⁻¹ ∇ℓ_i``.

Automatic damping (``damping="auto"``): ``λ = max(base, damping_fraction · mean(Λ))``, the mean over every
attributed parameter's (corrected) eigenvalue, never below the damping the training loss implies.

Magnitudes (``calibrate=True``, the default): the fitted inverse is ``α (Ĥ + λI)⁻¹`` with ``α`` the Galerkin
scale of :mod:`~lightning_influence.solvers.calibration` (``xᵀv / xᵀ(H + λI)x`` on 16 training-gradient probes,
one Hessian-vector product over at most 256 training examples), so scores and predicted loss changes have the
size of the Hessian solve. With parameters outside the Kronecker layers (diagonal or dense blocks) the two groups
get a scale each from the two-dimensional Galerkin fit, and a group whose scale comes out ``≤ 0`` is excluded
(scale 0, named in the ``magnitude_scale_rest`` diagnostic). ``res.settings``/diagnostics record
``magnitude_scale`` (the Kronecker layers') and ``magnitude_scale_rest``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checks import is_int, is_real
from ..curvature.damping import DampingChoice, DampingRule, DampingSpec, FactoredRule, Spectrum
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, InfluenceRuntimeError
from ..functional import batch_size_of
from ..seeds import Stream, derive_seed
from .base import Curvature, FactoredInverse, SolverKind, SolverSettings
from .calibration import group_scales, magnitude_scale
from .kronecker import LayerPlan, capture_layers, diagonal_grads, per_example_blocks, plan_layers

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["EKFACSettings", "KFACSettings", "KroneckerFactors", "KroneckerInverse", "dense_groups"]


def dense_groups(plan: LayerPlan, numels: Dict[str, int], max_size: int) -> List[Tensor]:
    """The parameters outside the Kronecker layers grouped by the module that owns them (a LayerNorm's weight
    and bias; a top-level parameter alone), as index tensors into their ``[D]`` vector (flat order), for the
    groups of 2 to ``max_size`` numbers: each gets its exact Fisher block. Larger groups stay diagonal."""
    groups: Dict[str, List[Tuple[int, int]]] = {}
    pos = 0
    for flat, user in zip(plan.diagonal, plan.diagonal_user_names):
        k = int(numels[flat])
        groups.setdefault(user.rsplit(".", 1)[0] if "." in user else user, []).append((pos, pos + k))
        pos += k
    out = []
    for spans in groups.values():
        size = sum(b - a for a, b in spans)
        if 2 <= size <= max_size:
            out.append(torch.cat([torch.arange(a, b) for a, b in spans]))
    return out


def _outside_blocks(d: int, blocks: Sequence[Tuple[Tensor, Any, Any]], device: Any) -> Tensor:
    """The local indices ``[0, d)`` in no dense block."""
    keep = torch.ones(d, dtype=torch.bool, device=device)
    for idx, _, _ in blocks:
        keep[idx.to(device)] = False
    return keep.nonzero().squeeze(1)


def _pass_seed(seed: int, pass_index: int, sample: int) -> int:
    """Fisher-draw seed of one pass over the data: a function of ``(seed, pass, sample)`` only."""
    return derive_seed(seed, Stream.FISHER_PASS, pass_index, sample)


@dataclass
class KroneckerFactors:
    """What the factor passes measured (independent of ``λ``): per layer the eigenbases ``q_a``, ``q_s``
    and eigenvalues ``Λ``, the diagonal part's curvature, and their cost."""

    plan: LayerPlan
    q_a: List[Tensor]
    q_s: List[Tensor]
    eigenvalues: List[Tensor]
    diagonal: Tensor
    seconds: Dict[str, float]
    fisher: str
    draws: int
    #: dense Fisher blocks of small leftover groups: ``(local index into diagonal, eigenvectors, eigenvalues)``
    blocks: List[Tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    def spectrum(self, name: str) -> Spectrum:
        """Smallest, largest and mean eigenvalue over every attributed parameter (Hessian units)."""
        plain = self.diagonal[_outside_blocks(self.diagonal.numel(), self.blocks, self.diagonal.device)]
        values = ([e.reshape(-1) for e in self.eigenvalues] + ([plain] if plain.numel() else [])
                  + [ev for _, _, ev in self.blocks])
        allv = torch.cat(values) if values else torch.zeros(1)
        return Spectrum(float(allv.min()), float(allv.max()), 0, None, float(allv.double().mean()),
                        f"{name.upper()} Fisher approximation")


@dataclass(frozen=True)
class _KroneckerSettings(SolverSettings):
    """Shared settings of K-FAC and EK-FAC.

    Args:
        damping_fraction: for ``damping="auto"``, ``λ = max(base, damping_fraction · mean eigenvalue)``.
        seed: seed of the Fisher draws (labels or sketches); the same seed gives the same factors.
        chunk_size: training examples per streamed chunk (``None``: the problem's ``chunk_size``).
        fisher_samples: Fisher draws per training example (each a full pass over the data); more draws
            lower the Monte-Carlo noise of ``S`` and ``Λ``. Ignored (one pass) for an empirical Fisher.
        calibrate: scale the inverse to the Hessian's magnitude (module docstring; needs exact
            Hessian-vector products, else ``α = 1``): ``True`` (default) one scale for the Kronecker layers and
            one for the parameters outside them, a group whose fitted scale is ``≤ 0`` excluded
            (:func:`~lightning_influence.solvers.calibration.group_scales`); ``"scalar"``: one scale for all (what
            a preconditioner gets: never a zero block); ``False``: the plain ``(Ĥ + λI)⁻¹``.
        dense_block_max: parameters without a Kronecker adapter (LayerNorms, positional parameters, …)
            are grouped by the module that owns them; a group of at most this many numbers gets its exact
            (dense) Fisher block, a larger one the diagonal. ``0`` (default): all diagonal. Measured against CG
            (Pearson, median; ``benchmarks/README.md``), 2048 against 0: the kronfluence benchmark's transformer
            classifier 0.827 / 0.789, BatchNorm CNN 0.813 / 0.801, ResNet block 0.726 / 0.699, its LM 0.852 /
            0.851, but the zoo transformer 0.582 / 0.612 and the zoo LM 0.649 / 0.714: a more exact Fisher
            block is not always nearer the Hessian, so it is not the default.
    """

    damping_fraction: float = 0.1
    seed: int = 0
    chunk_size: Optional[int] = None
    fisher_samples: int = 1
    calibrate: Union[bool, str] = True
    dense_block_max: int = 0

    def __post_init__(self) -> None:
        cls = type(self).__name__

        def bad(arg: str, what: str) -> InfluenceConfigError:
            return InfluenceConfigError(f"{cls}.{arg}={getattr(self, arg)!r} must be {what}.")

        def pos_int(v: Any) -> bool:
            return is_int(v) and v >= 1

        f = self.damping_fraction
        if not is_real(f) or not (0 < float(f) < math.inf):
            raise bad("damping_fraction", "a finite number > 0 (e.g. 0.1)")
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if not (self.chunk_size is None or pos_int(self.chunk_size)):
            raise bad("chunk_size", "a positive integer or None (the problem's chunk size)")
        if not pos_int(self.fisher_samples):
            raise bad("fisher_samples", "a positive integer (label draws per example)")
        if not (isinstance(self.calibrate, bool) or self.calibrate == "scalar"):
            raise bad("calibrate", "True (a scale per group), 'scalar' (one scale) or False")
        if not (is_int(self.dense_block_max) and self.dense_block_max >= 0):
            raise bad("dense_block_max", "an integer ≥ 0 (0: no dense blocks)")

    @property
    def corrected(self) -> bool:
        return False

    def for_preconditioning(self) -> "_KroneckerSettings":
        """A preconditioner must stay positive definite: one calibration scale, never an excluded group."""
        return dataclasses.replace(self, calibrate="scalar") if self.calibrate is True else self

    @property
    def damping_rule(self) -> DampingRule:
        return FactoredRule(self.damping_fraction)

    def estimate(self, problem: "InfluenceProblem", damping: DampingSpec) -> Curvature:
        """The factor pass (and, for EK-FAC, the eigenvalue-correction pass); their eigenvalues are the
        spectrum the damping rule reads."""
        factors = fit_factors(problem, self)
        return Curvature(factors.spectrum(self.name), state=factors)

    def build(self, problem: "InfluenceProblem", damping: DampingChoice, curvature: Curvature) -> "KroneckerInverse":
        f: KroneckerFactors = curvature.state
        inv = KroneckerInverse(problem, damping, f.plan, f.q_a, f.q_s, f.eigenvalues, f.diagonal, f.blocks)
        inv.facts = {"fisher": f.fisher}
        layers = f.plan.layers
        inv.setup = [
            Diagnostic("mean_eigenvalue", float(curvature.spectrum.mean or 0.0), "mean eigenvalue of Ĥ",
                       "mean of the (corrected) eigenvalues over all attributed parameters, Hessian units of the "
                       "mean loss"),
            Diagnostic("fisher", f.fisher, "Fisher labels", "'sampled': drawn from the model's predictive distribution "
                       "(default cross-entropy: a Gaussian sketch of the logits' Fisher; a sample-aware influence_loss: "
                       "its own draws): the true Fisher; 'empirical': the training labels"),
            Diagnostic("fisher_samples", f.draws, "Fisher draws per example", "passes over the data with fresh "
                       "draws per statistic"),
            Diagnostic("kronecker_layers", ", ".join(l.label for l in layers) or "(none)", "Kronecker layers",
                       "layers whose weight (and bias) curvature is Kronecker-factored (those with an adapter)"),
            Diagnostic("kronecker_coverage", f.plan.kronecker_coverage, "Kronecker coverage",
                       "fraction of the attributed parameters whose curvature is Kronecker-factored (0 to 1); the "
                       "rest, named in diagonal_params, get a diagonal curvature"),
            Diagnostic("diagonal_params", ", ".join(f.plan.diagonal_user_names) or "(none)", "diagonal parameters",
                       "attributed parameters outside the factored layers: their exact Fisher block when their "
                       "module's group is small (dense_block_params), else their mean squared Fisher gradient "
                       "(diagonal)"),
            Diagnostic("dense_block_params", sum(int(idx.numel()) for idx, _, _ in f.blocks), "dense-block parameters",
                       "how many of the diagonal_params have their module's exact Fisher block (dense_block_max)"),
            Diagnostic("factor_seconds", f.seconds["factors"], "factor pass (s)", "seconds for the pass(es) that "
                       "accumulate A, S and the diagonal"),
        ]
        if self.corrected:
            inv.setup.append(Diagnostic("correction_seconds", f.seconds["correction"], "eigenvalue pass (s)",
                                        "seconds for the pass(es) that estimate the corrected eigenvalues"))
        if self.calibrate:
            t0 = time.perf_counter()
            if self.calibrate == "scalar":
                inv.scale, found = magnitude_scale(problem, inv, seed=self.seed)
                inv.rest_scale = inv.scale
            else:
                rest = torch.cat([inv._diag_index] + [idx for idx, _, _ in inv.blocks])
                inv.scale, inv.rest_scale, found = group_scales(
                    problem, inv, rest, seed=self.seed, rest_names=f.plan.diagonal_user_names,
                    rest_share=1.0 - f.plan.kronecker_coverage)
            inv.setup += found + [Diagnostic("calibration_seconds", time.perf_counter() - t0, "calibration (s)",
                                             "seconds for the probes' gradients and their Hessian-vector product")]
        return inv


@dataclass(frozen=True)
class KFACSettings(_KroneckerSettings, name="kfac", kind=SolverKind.FACTORED):
    """K-FAC (KFC for ``Conv2d``): eigenvalues ``d_S ⊗ d_A`` of the Kronecker factors; one pass over the
    data (``fisher_samples`` passes with several label draws). See :class:`_KroneckerSettings` for the
    arguments."""


@dataclass(frozen=True)
class EKFACSettings(_KroneckerSettings, name="ekfac", kind=SolverKind.FACTORED):
    """EK-FAC: K-FAC's eigenbases with the Fisher's exact diagonal in them (eigenvalue correction), from a
    second pass with fresh labels; never worse than K-FAC in Frobenius norm for the same bases. See
    :class:`_KroneckerSettings` for the arguments."""

    @property
    def corrected(self) -> bool:
        return True


def _fisher_passes(problem: "InfluenceProblem", settings: _KroneckerSettings, pass_index: int) -> Iterator[Tuple[int, Any]]:
    """``(start, batch)`` over this process's shard, ``fisher_samples`` draws (one for an empirical Fisher),
    with the global RNG seeded per draw (a ``sample``-aware ``influence_loss`` draws from it)."""
    draws = settings.fisher_samples if problem.objective.fisher == "sampled" else 1
    chunk = settings.chunk_size or problem.chunk_size
    dev = problem.device
    for r in range(draws):
        seed = _pass_seed(settings.seed, pass_index, r)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(problem.rank_seed(seed))  # each process's shard draws its own labels
            yield from problem.fisher_chunks(seed, chunk)


def fit_factors(problem: "InfluenceProblem", settings: _KroneckerSettings) -> KroneckerFactors:
    """The Kronecker factors, their eigenbases and (EK-FAC) corrected eigenvalues, streamed over the
    training set in one (two) declared sums."""
    obj = problem.objective
    dtype, device = problem.dtype, problem.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # the DataLoader and a sampling loss draw from the global RNG
        first = next(iter(problem.train.chunks(settings.chunk_size or problem.chunk_size)))[1]
        n_first = batch_size_of(first)
        plan = plan_layers(obj, obj.fisher_batch(first, settings.seed, problem.train.indices[:n_first].tolist()))
    layers = plan.layers
    count = lambda: torch.zeros(1, dtype=dtype, device=device)  # noqa: E731
    groups = [g.to(device) for g in dense_groups(plan, dict(zip(obj.space.names, obj.space.numels)),
                                                 settings.dense_block_max)]

    def zero() -> Dict[str, Any]:
        return {"a": [torch.zeros(l.in_dim, l.in_dim, dtype=dtype, device=device) for l in layers],
                "s": [torch.zeros(l.out_features, l.out_features, dtype=dtype, device=device) for l in layers],
                "tokens": [count() for _ in layers], "d": torch.zeros(plan.diagonal_index.numel(), dtype=dtype,
                                                                       device=device), "n": count(),
                "blocks": [torch.zeros(g.numel(), g.numel(), dtype=dtype, device=device) for g in groups]}

    def factor_stats(_start: int, batch: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {"a": [], "s": [], "tokens": [], "n": count() + batch_size_of(batch)}
        for a, g in capture_layers(obj, plan, batch):
            a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            out["a"].append(a2.T @ a2)
            out["s"].append(g2.T @ g2)
            out["tokens"].append(count() + g2.shape[0])
        dg = diagonal_grads(obj, plan, batch) if plan.diagonal else None
        out["d"] = dg.square().sum(0) if dg is not None else torch.zeros(0, dtype=dtype, device=device)
        out["blocks"] = [dg[:, g].T @ dg[:, g] for g in groups] if dg is not None else []
        return {k: out[k] for k in ("a", "s", "tokens", "d", "n", "blocks")}

    t0 = time.perf_counter()
    stats = problem.train_sum(factor_stats, zero, _fisher_passes(problem, settings, 0))
    factor_seconds = time.perf_counter() - t0
    n_seen = float(stats["n"])
    diagonal = stats["d"] / n_seen
    q_a, q_s, d_a, d_s = [], [], [], []
    for k, layer in enumerate(layers):
        # A = (1/n) Σ a aᵀ;  S = (1/(n·T)) Σ g gᵀ  (so S ⊗ A is the Fisher of the mean loss)
        ea, va = _eigh(stats["a"][k] / n_seen, layer.label, "input")
        s_k = stats["s"][k] / max(float(stats["tokens"][k]), 1.0)
        # a one-hot row vector (Embedding) makes S diagonal: its eigenbasis is the identity
        es, vs = ((torch.diagonal(s_k).clamp_min(0), torch.eye(s_k.shape[0], dtype=s_k.dtype, device=s_k.device))
                  if layer.adapter.diagonal_rows else _eigh(s_k, layer.label, "output"))
        q_a.append(va)
        q_s.append(vs)
        d_a.append(ea)
        d_s.append(es)
    # K-FAC: Λ = d_S ⊗ d_A, the eigenvalues of S ⊗ A
    eigenvalues = [(d_s[k][:, None] * d_a[k][None, :]) for k in range(len(layers))]
    correct_seconds = 0.0
    if settings.corrected and layers:
        t1 = time.perf_counter()

        def zero_lam() -> Dict[str, Any]:
            return {"lam": [torch.zeros(l.out_features, l.in_dim, dtype=dtype, device=device) for l in layers],
                    "n": count()}

        def corrected(_start: int, batch: Any) -> Dict[str, Any]:
            lam = []
            for k, (a, g) in enumerate(capture_layers(obj, plan, batch)):
                # rotate first: Q_Sᵀ G Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ
                lam.append(sum(blk.square().sum(0) for blk in per_example_blocks(a @ q_a[k], g @ q_s[k])))
            return {"lam": lam, "n": count() + batch_size_of(batch)}

        lam = problem.train_sum(corrected, zero_lam, _fisher_passes(problem, settings, 1))
        eigenvalues = [s / float(lam["n"]) for s in lam["lam"]]
        correct_seconds = time.perf_counter() - t1
    for k in range(len(layers)):
        if not bool(torch.isfinite(eigenvalues[k]).all()):
            raise InfluenceRuntimeError(
                f"the curvature of layer {layers[k].label!r} has NaN/inf entries: some training example has a "
                "non-finite loss gradient at the trained weights. Check the data and the loss."
            )
    fisher = obj.fisher
    draws = settings.fisher_samples if fisher == "sampled" else 1
    blocks = []
    for g, b in zip(groups, stats["blocks"]):
        ev, q = _eigh(b / n_seen, ", ".join(plan.diagonal_user_names), "dense block")
        blocks.append((g, q, ev))
    return KroneckerFactors(plan, q_a, q_s, eigenvalues, diagonal,
                            {"factors": factor_seconds, "correction": correct_seconds}, fisher, draws, blocks)


class KroneckerInverse(FactoredInverse):
    """``(Ĥ + λI)⁻¹`` for K-FAC/EK-FAC, held as per-layer eigenbases and eigenvalues plus a diagonal.

    Attributes:
        plan: which parameters are Kronecker-factored (``plan.layers``) and which diagonal.
        q_a, q_s: per layer, the eigenvectors of ``A`` ``[in', in']`` and of ``S`` ``[out, out]``.
        eigenvalues: per layer, ``Λ [out, in']`` (K-FAC products or EK-FAC corrected).
        diagonal: the diagonal curvature ``[D]`` of ``plan.diagonal_index``.
    """

    def __init__(self, problem: "InfluenceProblem", damping: Union[float, DampingChoice], plan: LayerPlan,
                 q_a: List[Tensor], q_s: List[Tensor], eigenvalues: List[Tensor], diagonal: Tensor,
                 blocks: Sequence[Tuple[Tensor, Tensor, Tensor]] = ()) -> None:
        super().__init__(problem, damping)
        self.plan = plan
        self.q_a, self.q_s, self.eigenvalues, self.diagonal = q_a, q_s, eigenvalues, diagonal
        all_diag = plan.diagonal_index.to(problem.device)
        plain = _outside_blocks(int(all_diag.numel()), blocks, problem.device)
        #: flat coordinates of the diagonal part and its curvature; the dense blocks' coordinates and bases
        self._diag_index, self._diag_values = all_diag[plain], diagonal.to(problem.device)[plain]
        self.blocks = [(all_diag[idx.to(problem.device)], q, ev) for idx, q, ev in blocks]
        #: ``α_K``: the Kronecker layers' block of the inverse applied is ``α_K (Ĥ + λI)⁻¹`` (1 until calibrated;
        #: see ``calibrate``)
        self.scale = 1.0
        #: ``α_D``: the same for the diagonal part and the dense blocks (0: those parameters are excluded)
        self.rest_scale = 1.0

    # ------------------------------------------------------------------ applying
    def _map(self, vectors: Tensor, power: float) -> Tensor:
        """``Q diag(α (Λ + λ)^(−1))^power Qᵀ V`` (``α``: the group's scale)."""
        out = torch.empty_like(vectors)
        a_k, a_d = self.scale ** power, self.rest_scale ** power
        for k, layer in enumerate(self.plan.layers):
            qa, qs = self.q_a[k].to(vectors.dtype), self.q_s[k].to(vectors.dtype)
            rot = qs.T @ layer.gather(vectors) @ qa
            rot = rot * ((self.eigenvalues[k].to(vectors.dtype) + self.damping).pow(-power) * a_k)
            layer.scatter(qs @ rot @ qa.T, out)
        if self._diag_index.numel():
            idx = self._diag_index
            out[:, idx] = vectors[:, idx] * ((self._diag_values.to(vectors.dtype) + self.damping).pow(-power) * a_d)
        for idx, q, ev in self.blocks:
            q = q.to(vectors.dtype)
            out[:, idx] = ((vectors[:, idx] @ q) * ((ev.to(vectors.dtype) + self.damping).pow(-power) * a_d)) @ q.T
        return out

    def apply(self, vectors: Tensor) -> Tensor:
        """``α (Ĥ + λI)⁻¹ V`` for every row of ``vectors`` ``[Q, P]`` (each group with its own ``α``)."""
        return self._map(vectors, 1.0)

    def apply_inverse_sqrt(self, vectors: Tensor) -> Tensor:
        """``√α (Ĥ + λI)^{-1/2} V`` (symmetric square root) for every row of ``vectors`` ``[Q, P]``."""
        return self._map(vectors, 0.5)

    def quadratic(self, grads: Tensor) -> Tuple[Tensor, List[Diagnostic]]:
        """``α g_iᵀ (Ĥ + λI)⁻¹ g_i`` per row of ``grads`` ``[B, P]``: ``α_K Σ (Q_Sᵀ G Q_A)² / (Λ + λ)`` per layer
        plus ``α_D Σ g²/(d + λ)`` on the diagonal; no back rotation."""
        total = grads.new_zeros(grads.shape[0])
        for k, layer in enumerate(self.plan.layers):
            qa, qs = self.q_a[k].to(grads.dtype), self.q_s[k].to(grads.dtype)
            rot = qs.T @ layer.gather(grads) @ qa
            total += (rot.square() / (self.eigenvalues[k].to(grads.dtype) + self.damping)).sum(dim=(1, 2))
        rest = grads.new_zeros(grads.shape[0])
        if self._diag_index.numel():
            g = grads[:, self._diag_index]
            rest += (g.square() / (self._diag_values.to(grads.dtype) + self.damping)).sum(dim=1)
        for idx, q, ev in self.blocks:
            rest += ((grads[:, idx] @ q.to(grads.dtype)).square() / (ev.to(grads.dtype) + self.damping)).sum(dim=1)
        return self.scale * total + self.rest_scale * rest, []


def _eigh(m: Tensor, layer: str, which: str) -> Tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD factor in float64, eigenvalues clipped at 0, cast back."""
    m64 = m.double()
    m64 = 0.5 * (m64 + m64.T)
    try:
        evals, evecs = torch.linalg.eigh(m64)
    except RuntimeError as err:  # pragma: no cover - NaN factors
        raise InfluenceRuntimeError(
            f"the {which} factor of layer {layer!r} could not be eigendecomposed ({err}); it probably holds NaN/inf "
            "from a non-finite activation or gradient."
        ) from err
    return evals.clamp_min(0).to(m.dtype), evecs.to(m.dtype)
