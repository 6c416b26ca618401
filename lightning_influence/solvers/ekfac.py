"""K-FAC and EK-FAC: the Fisher of the mean training loss in Kronecker-factored eigenbases.

Per Kronecker layer (see :mod:`lightning_influence.kronecker` for the factors ``A``, ``S`` and their
scaling), with ``A = Q_A diag(d_A) Q_Aᵀ`` and ``S = Q_S diag(d_S) Q_Sᵀ``, the curvature block is

    Ĥ_layer = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ,

* K-FAC (Martens & Grosse, 2015; KFC for convolutions): ``Λ[o, i] = d_S[o] · d_A[i]``, i.e. ``S ⊗ A``;
* EK-FAC (George et al., 2018; Grosse et al., 2023): ``Λ[o, i] = (1/n) Σ_m E_y[(Q_Sᵀ G_m Q_A)²_{oi}]``,
  the Fisher's exact diagonal in that eigenbasis (``G_m`` example ``m``'s layer gradient), estimated in a
  second pass with fresh draws from the predictive distribution.

Layers are independent blocks (block-diagonal across layers); parameters outside Linear/Conv2d layers get
their mean squared Fisher gradient (the corrected eigenvalues in the identity basis). Then

    (Ĥ + λI)⁻¹ V:   rotate each layer block ``V [Q, out, in']`` to ``Q_Sᵀ V Q_A``, divide by ``Λ + λ``,
    rotate back; ``(Ĥ + λI)^{-1/2}`` divides by ``√(Λ + λ)``;
    ``gᵀ(Ĥ + λI)⁻¹g = Σ (Q_Sᵀ G Q_A)²/(Λ + λ)``.

The Fisher is the Gauss–Newton matrix for cross-entropy (and other canonical-link losses), a positive
semi-definite stand-in for the Hessian ``H``; ``λ`` is in the Hessian units of the mean loss like every
solver's. Influence scores keep Koh & Liang's sign: ``I(z_i, z_q) = −∇ℓ_qᵀ (Ĥ + λI)⁻¹ ∇ℓ_i``.

Automatic damping (``damping="auto"``): ``λ = max(base, damping_fraction · mean(Λ))``, the mean over every
attributed parameter's (corrected) eigenvalue, never below the damping the training loss implies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, List, Optional, Tuple

import torch
from torch import Tensor

from ..checks import is_int, is_real
from ..damping import AutoDamping
from ..diagnostics import Diagnostic
from ..errors import InfluenceConfigError, InfluenceRuntimeError
from ..functional import batch_size_of
from ..kronecker import LayerPlan, capture_layers, diagonal_grads, per_example_blocks, plan_layers
from .base import DampingSpec, FactoredInverse, SolverSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..problem import InfluenceProblem

__all__ = ["EKFACSettings", "KFACSettings", "KroneckerInverse"]


def _pass_seed(seed: int, pass_index: int, sample: int) -> int:
    """Label-sampling seed of one pass over the data: a function of ``(seed, pass, sample)`` only."""
    return (int(seed) * 1_000_003 + 104_729 * int(pass_index) + 7919 * int(sample) + 11) % (2**62)


@dataclass(frozen=True)
class _KroneckerSettings(SolverSettings):
    """Shared settings of K-FAC and EK-FAC.

    Args:
        damping_fraction: for ``damping="auto"``, ``λ = max(base, damping_fraction · mean eigenvalue)``.
        seed: seed of the Fisher draws (labels or sketches); the same seed gives the same factors.
        chunk_size: training examples per streamed chunk (``None``: the problem's ``chunk_size``).
        fisher_samples: Fisher draws per training example (each a full pass over the data); more draws
            lower the Monte-Carlo noise of ``S`` and ``Λ``. Ignored (one pass) for an empirical Fisher.
    """

    factored: ClassVar[bool] = True
    damping_fraction: float = 0.1
    seed: int = 0
    chunk_size: Optional[int] = None
    fisher_samples: int = 1

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

    @property
    def corrected(self) -> bool:
        return False

    def fit(self, problem: "InfluenceProblem", damping: DampingSpec) -> "KroneckerInverse":
        """Capture the factors (and, for EK-FAC, the corrected eigenvalues) and resolve ``λ``."""
        return KroneckerInverse.fit(problem, damping, self)


@dataclass(frozen=True)
class KFACSettings(_KroneckerSettings):
    """K-FAC (KFC for ``Conv2d``): eigenvalues ``d_S ⊗ d_A`` of the Kronecker factors; one pass over the
    data (``fisher_samples`` passes with several label draws). See :class:`_KroneckerSettings` for the
    arguments."""

    name = "kfac"


@dataclass(frozen=True)
class EKFACSettings(_KroneckerSettings):
    """EK-FAC: K-FAC's eigenbases with the Fisher's exact diagonal in them (eigenvalue correction), from a
    second pass with fresh labels; never worse than K-FAC in Frobenius norm for the same bases. See
    :class:`_KroneckerSettings` for the arguments."""

    name = "ekfac"

    @property
    def corrected(self) -> bool:
        return True


def _passes(problem: "InfluenceProblem", settings: _KroneckerSettings, pass_index: int):
    """``(batch)`` over the training set, ``fisher_samples`` label draws (one for an empirical Fisher)."""
    draws = settings.fisher_samples if problem.objective.fisher == "sampled" else 1
    chunk = settings.chunk_size or problem.chunk_size
    for r in range(draws):
        for _, batch in problem.fisher_chunks(_pass_seed(settings.seed, pass_index, r), chunk):
            yield batch


class _Rng:
    """Seed the global RNG (a ``sample``-aware ``influence_loss`` draws from it) for one pass; the caller's
    RNG state is restored afterwards."""

    def __init__(self, problem: "InfluenceProblem", seed: int) -> None:
        dev = problem.device
        self._fork = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
        self._seed = seed + 1_000_003 * problem.comm.rank  # each process's shard draws its own labels

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


class KroneckerInverse(FactoredInverse):
    """``(Ĥ + λI)⁻¹`` for K-FAC/EK-FAC, held as per-layer eigenbases and eigenvalues plus a diagonal.

    Attributes:
        plan: which parameters are Kronecker-factored (``plan.layers``) and which diagonal.
        q_a, q_s: per layer, the eigenvectors of ``A`` ``[in', in']`` and of ``S`` ``[out, out]``.
        eigenvalues: per layer, ``Λ [out, in']`` (K-FAC products or EK-FAC corrected).
        diagonal: the diagonal curvature ``[D]`` of ``plan.diagonal_index``.
        damping: ``λ``; ``damping_record``: how it was chosen, as a flat dict.
    """

    def __init__(self, problem: "InfluenceProblem", damping: float, plan: LayerPlan, q_a: List[Tensor],
                 q_s: List[Tensor], eigenvalues: List[Tensor], diagonal: Tensor) -> None:
        super().__init__(problem, damping)
        self.plan = plan
        self.q_a, self.q_s, self.eigenvalues, self.diagonal = q_a, q_s, eigenvalues, diagonal
        index = plan.diagonal_index.to(problem.device)
        self._diag_index = index

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, problem: "InfluenceProblem", damping: DampingSpec, settings: _KroneckerSettings) -> "KroneckerInverse":
        obj = problem.objective
        dtype, device = problem.dtype, problem.device
        with _Rng(problem, settings.seed):  # the DataLoader and a sampling loss draw from the global RNG
            first = next(iter(problem.train.chunks(settings.chunk_size or problem.chunk_size)))[1]
            plan = plan_layers(obj, obj.fisher_batch(first, torch.Generator().manual_seed(0)))
        layers = plan.layers
        # pass 1: factors A, S and the diagonal part
        t0 = time.perf_counter()
        a_sum = [torch.zeros(l.in_dim, l.in_dim, dtype=dtype, device=device) for l in layers]
        s_sum = [torch.zeros(l.out_features, l.out_features, dtype=dtype, device=device) for l in layers]
        tokens = [0] * len(layers)
        d_sum = torch.zeros(plan.diagonal_index.numel(), dtype=dtype, device=device)
        n_seen = 0
        with _Rng(problem, _pass_seed(settings.seed, 0, 0)):
            for batch in _passes(problem, settings, 0):
                n_seen += batch_size_of(batch)
                for k, (a, g) in enumerate(capture_layers(obj, plan, batch)):
                    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
                    a_sum[k].add_(a2.T @ a2)
                    s_sum[k].add_(g2.T @ g2)
                    tokens[k] += g2.shape[0]
                if plan.diagonal:
                    d_sum.add_(diagonal_grads(obj, plan, batch).square().sum(0))
        # this process's shard so far: sum the statistics of every shard (one collective)
        counts = torch.tensor([n_seen, *tokens], dtype=dtype, device=device)
        *sums, d_sum, counts = problem.comm.all_reduce_sum_all([*a_sum, *s_sum, d_sum, counts])
        a_sum, s_sum = sums[: len(layers)], sums[len(layers):]
        n_seen, tokens = int(counts[0].item()), [int(c) for c in counts[1:].tolist()]
        factor_seconds = time.perf_counter() - t0
        diagonal = d_sum / n_seen
        q_a, q_s, d_a, d_s = [], [], [], []
        for k in range(len(layers)):
            # A = (1/n) Σ a aᵀ;  S = (1/(n·T)) Σ g gᵀ  (so S ⊗ A is the Fisher of the mean loss)
            ea, va = _eigh(a_sum[k] / n_seen, layers[k].label, "input")
            es, vs = _eigh(s_sum[k] / max(tokens[k], 1), layers[k].label, "output")
            q_a.append(va)
            q_s.append(vs)
            d_a.append(ea)
            d_s.append(es)
        # K-FAC: Λ = d_S ⊗ d_A, the eigenvalues of S ⊗ A
        eigenvalues = [(d_s[k][:, None] * d_a[k][None, :]) for k in range(len(layers))]
        correct_seconds = 0.0
        if settings.corrected and layers:
            t1 = time.perf_counter()
            lam_sum = [torch.zeros(l.out_features, l.in_dim, dtype=dtype, device=device) for l in layers]
            n2 = 0
            with _Rng(problem, _pass_seed(settings.seed, 1, 0)):
                for batch in _passes(problem, settings, 1):
                    n2 += batch_size_of(batch)
                    for k, (a, g) in enumerate(capture_layers(obj, plan, batch)):
                        # rotate first: Q_Sᵀ G Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ
                        for blk in per_example_blocks(a @ q_a[k], g @ q_s[k]):
                            lam_sum[k].add_(blk.square().sum(0))
            *lam_sum, n2_sum = problem.comm.all_reduce_sum_all([*lam_sum, torch.tensor([n2], dtype=dtype, device=device)])
            n2 = int(n2_sum.item())
            eigenvalues = [lam / n2 for lam in lam_sum]
            correct_seconds = time.perf_counter() - t1
        for k in range(len(layers)):
            if not bool(torch.isfinite(eigenvalues[k]).all()):
                raise InfluenceRuntimeError(
                    f"the curvature of layer {layers[k].label!r} has NaN/inf entries: some training example has a "
                    "non-finite loss gradient at the trained weights. Check the data and the loss."
                )
        count = sum(int(e.numel()) for e in eigenvalues) + int(diagonal.numel())
        total = sum(float(e.sum()) for e in eigenvalues) + float(diagonal.sum())
        mean_eig = total / max(count, 1)
        smallest = min([float(e.min()) for e in eigenvalues] + ([float(diagonal.min())] if diagonal.numel() else []))
        if isinstance(damping, AutoDamping):
            lam = max(float(damping.base), settings.damping_fraction * mean_eig)
            record = {"damping": lam, "damping_mode": "auto", "damping_base": float(damping.base),
                      "damping_fraction": settings.damping_fraction, "mean_eigenvalue": mean_eig}
            how = f"auto: max(base={damping.base:g}, {settings.damping_fraction:g} × mean eigenvalue)"
        else:
            lam = float(damping)
            record = {"damping": lam, "damping_mode": "fixed", "mean_eigenvalue": mean_eig}
            how = "fixed"
        if not (lam + smallest > 0):
            raise InfluenceConfigError(
                f"damping={lam:g} leaves Ĥ + λI singular: the {settings.name} curvature has eigenvalue "
                f"{smallest:.3g} (directions no training example moves). Use damping > 0, or damping='auto'."
            )
        inv = cls(problem, lam, plan, q_a, q_s, eigenvalues, diagonal)
        inv.damping_record = record
        fisher = obj.fisher
        draws = settings.fisher_samples if fisher == "sampled" else 1
        inv.setup = [
            Diagnostic("damping", lam, "damping λ", f"added to the {settings.name.upper()} curvature ({how})"),
            Diagnostic("damping_mode", record["damping_mode"], "damping mode", "'auto' (from the mean eigenvalue) "
                       "or 'fixed' (given)"),
            Diagnostic("mean_eigenvalue", mean_eig, "mean eigenvalue of Ĥ", "mean of the (corrected) eigenvalues "
                       "over all attributed parameters, Hessian units of the mean loss"),
            Diagnostic("fisher", fisher, "Fisher labels", "'sampled': drawn from the model's predictive distribution "
                       "(default cross-entropy: a Gaussian sketch of the logits' Fisher; a sample-aware influence_loss: "
                       "its own draws): the true Fisher; 'empirical': the training labels"),
            Diagnostic("fisher_samples", draws, "Fisher draws per example", "passes over the data with fresh "
                       "draws per statistic"),
            Diagnostic("kronecker_layers", ", ".join(l.label for l in layers) or "(none)", "Kronecker layers",
                       "Linear/Conv2d layers whose weight (and bias) curvature is Kronecker-factored"),
            Diagnostic("diagonal_params", ", ".join(plan.diagonal_user_names) or "(none)", "diagonal parameters",
                       "attributed parameters outside Linear/Conv2d layers: curvature is their mean squared "
                       "Fisher gradient (diagonal)"),
            Diagnostic("factor_seconds", factor_seconds, "factor pass (s)", "seconds for the pass(es) that "
                       "accumulate A, S and the diagonal"),
        ]
        if settings.corrected:
            inv.setup.append(Diagnostic("correction_seconds", correct_seconds, "eigenvalue pass (s)",
                                        "seconds for the pass(es) that estimate the corrected eigenvalues"))
        return inv

    # ------------------------------------------------------------------ applying
    def _map(self, vectors: Tensor, power: float) -> Tensor:
        """``Q diag((Λ + λ)^(−power)) Qᵀ V``."""
        out = torch.empty_like(vectors)
        for k, layer in enumerate(self.plan.layers):
            qa, qs = self.q_a[k].to(vectors.dtype), self.q_s[k].to(vectors.dtype)
            rot = qs.T @ layer.gather(vectors) @ qa
            rot = rot * (self.eigenvalues[k].to(vectors.dtype) + self.damping).pow(-power)
            layer.scatter(qs @ rot @ qa.T, out)
        if self._diag_index.numel():
            idx = self._diag_index
            out[:, idx] = vectors[:, idx] * (self.diagonal.to(vectors.dtype) + self.damping).pow(-power)
        return out

    def apply(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)⁻¹ V`` for every row of ``vectors`` ``[Q, P]``."""
        return self._map(vectors, 1.0)

    def apply_inverse_sqrt(self, vectors: Tensor) -> Tensor:
        """``(Ĥ + λI)^{-1/2} V`` (symmetric square root) for every row of ``vectors`` ``[Q, P]``."""
        return self._map(vectors, 0.5)

    def quadratic(self, grads: Tensor) -> Tuple[Tensor, List[Diagnostic]]:
        """``g_iᵀ (Ĥ + λI)⁻¹ g_i`` per row of ``grads`` ``[B, P]``: ``Σ (Q_Sᵀ G Q_A)² / (Λ + λ)`` per layer
        plus ``Σ g²/(d + λ)`` on the diagonal; no back rotation."""
        total = grads.new_zeros(grads.shape[0])
        for k, layer in enumerate(self.plan.layers):
            qa, qs = self.q_a[k].to(grads.dtype), self.q_s[k].to(grads.dtype)
            rot = qs.T @ layer.gather(grads) @ qa
            total += (rot.square() / (self.eigenvalues[k].to(grads.dtype) + self.damping)).sum(dim=(1, 2))
        if self._diag_index.numel():
            g = grads[:, self._diag_index]
            total += (g.square() / (self.diagonal.to(grads.dtype) + self.damping)).sum(dim=1)
        return total, []


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
