"""Damping: how much ``λI`` to add to the curvature a solver inverts, chosen once per run and recorded once.

Influence functions assume ``H + λI`` is positive definite (the trained weights minimise a quadratic
model of the loss). A network stopped by SGD or Adam is rarely at a strict minimum: its Hessian has
negative eigenvalues, and then LiSSA's Neumann series diverges, CG meets non-positive curvature and a
dense solve returns numbers without meaning. ``λ`` is in the units of ``H``, the Hessian of the *mean*
training loss.

What a user passes (:func:`resolve_damping`): a fixed ``λ ≥ 0``, or ``"auto"`` / :class:`AutoDamping`,
whose ``base`` is the damping the training loss already implies (its coupled L2 weight decay:
:meth:`AutoDamping.from_optimizer` reads it from an optimizer, for the callback and for
:func:`~lightning_influence.pipeline.compute_influence` alike).

Which rule turns ``"auto"`` into a number depends on what the solver inverts (its
:attr:`~lightning_influence.solvers.base.SolverSettings.damping_rule`); each rule takes the curvature
measured before the inverse is built (a :class:`Spectrum`) and returns one :class:`DampingChoice`, the
only record of ``λ`` in the results:

* :class:`SpectrumRule` (the Hessian solvers): from the extreme eigenvalues of ``H`` (Lanczos, or the
  dense Hessian's exact ones),

      λ = max(base, −λ̂_min + margin),   margin = max((safety − 1)·max(0, −λ̂_min), floor·|λ̂_max|),

  so the smallest eigenvalue estimate of ``H + λI`` is at least ``margin`` (a fraction of the negative
  curvature, and at least ``floor`` of the largest eigenvalue: a bound on the condition number). Lanczos
  Ritz values never overshoot the extreme eigenvalues (``λ̂_min ≥ λ_min``), hence the margin. A fixed
  ``λ`` is checked against the same estimate (:func:`check_curvature`).
* :class:`FactoredRule` (K-FAC, EK-FAC): ``λ = max(base, fraction · mean eigenvalue)`` of the
  Kronecker-factored approximation; a fixed ``λ`` must keep it non-singular.

Example:
    >>> rule = SpectrumRule()
    >>> choice = rule.choose(AutoDamping(base=0.01), Spectrum(lambda_min=-0.2, lambda_max=50.0, passes=60))
    >>> round(choice.value, 6), choice.mode
    (0.3, 'auto')
    >>> rule.choose(0.5, Spectrum(-0.2, 50.0, 60)).value
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..checks import is_int, is_real
from ..errors import InfluenceConfigError, NegativeCurvatureError
from .spectral import Lanczos, lanczos_run

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..problem import InfluenceProblem

__all__ = ["DEFAULT_DAMPING", "AutoDamping", "DampingChoice", "DampingRule", "DampingSpec", "FactoredRule", "FixedDamping",
           "HessianKrylov", "Spectrum", "SpectrumRule", "check_curvature", "damping_for_optimizers", "estimate_spectrum",
           "optimizer_damping", "optimizer_l2", "resolve_damping"]

#: The fixed damping of ``damping=None`` (:func:`damping_for_optimizers`) when the optimizer has no coupled L2
#: (Hessian units); every function's default is ``damping="auto"``.
DEFAULT_DAMPING = 1e-3

#: optimizers whose ``weight_decay`` adds ``wd·θ`` to the gradient (an L2 term ``wd/2·‖θ‖²`` in the loss)
_COUPLED_L2 = ("SGD", "Adam", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD")


@dataclass(frozen=True)
class AutoDamping:
    """Choose the damping from the curvature (``damping="auto"`` is ``AutoDamping()``).

    Args:
        base: damping the training loss already implies (e.g. its coupled L2 weight decay), Hessian units;
            ``λ`` never goes below it.
        safety: ``> 1``; with negative curvature, ``λ ≥ safety · |λ̂_min|`` (unless ``base`` is larger).
        floor: ``> 0``; the smallest eigenvalue of ``H + λI`` is kept at least ``floor · |λ̂_max(H)|``
            (unless ``base`` gives more), which bounds its condition number by about ``1/floor``.
        iters: at most this many Lanczos steps (full-data Hessian-vector products) for the estimate.
        settle_tol: stop Lanczos early (after at least ``2 · settle_every`` steps, checked every
            ``settle_every``) once the damping this rule would choose moved by at most ``settle_tol`` (relative)
            over the last ``settle_every`` steps; ``None``: always ``iters`` steps. A solver whose Krylov space
            later finds more negative curvature raises ``λ`` by the same rule (``damping_rule`` in the record).
        seed: start vector of Lanczos (and the subset below).
        max_examples: Lanczos sees the mean-loss Hessian of at most this many training examples, drawn at
            random (``None``: all of them), so the estimate costs ``iters × max_examples`` example-HVPs
            whatever ``n``.
        source: where ``base`` comes from, recorded with the results (e.g. ``"SGD weight_decay (coupled
            L2)"``; :meth:`from_optimizer` fills it in).
    """

    base: float = 0.0
    safety: float = 1.5
    floor: float = 1e-3
    iters: int = 60
    seed: int = 0
    max_examples: Optional[int] = 4096
    source: str = ""
    settle_tol: Optional[float] = 0.02
    settle_every: int = 10

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return is_real(v) and math.isfinite(float(v))

        if not (number(self.base) and self.base >= 0):
            raise InfluenceConfigError(f"AutoDamping.base={self.base!r} must be a finite number ≥ 0.")
        if not (number(self.floor) and self.floor > 0):
            raise InfluenceConfigError(f"AutoDamping.floor={self.floor!r} must be a finite number > 0 (e.g. 1e-3).")
        if not (number(self.safety) and self.safety > 1):
            raise InfluenceConfigError(f"AutoDamping.safety={self.safety!r} must be a finite number > 1 (e.g. 1.5).")
        if not is_int(self.iters) or self.iters < 2:
            raise InfluenceConfigError(f"AutoDamping.iters={self.iters!r} must be an integer ≥ 2.")
        if not is_int(self.seed):
            raise InfluenceConfigError(f"AutoDamping.seed={self.seed!r} must be an integer.")
        if not (self.max_examples is None or (is_int(self.max_examples) and self.max_examples >= 1)):
            raise InfluenceConfigError(f"AutoDamping.max_examples={self.max_examples!r} must be None or a positive "
                                       "integer (e.g. 4096).")
        if not isinstance(self.source, str):
            raise InfluenceConfigError(f"AutoDamping.source={self.source!r} must be a string.")
        if not (self.settle_tol is None or (number(self.settle_tol) and self.settle_tol >= 0)):
            raise InfluenceConfigError(f"AutoDamping.settle_tol={self.settle_tol!r} must be None or a number ≥ 0 "
                                       "(e.g. 0.02).")
        if not is_int(self.settle_every) or self.settle_every < 1:
            raise InfluenceConfigError(f"AutoDamping.settle_every={self.settle_every!r} must be a positive integer.")

    def settled(self, lo: List[float], hi: List[float]) -> bool:
        """Whether the Lanczos run with Ritz extremes ``lo``/``hi`` after each step may stop (``settle_tol``)."""
        k, every = len(lo), self.settle_every
        if self.settle_tol is None or k < 2 * every or k % every:
            return False
        now, before = self.choose(lo[-1], hi[-1]), self.choose(lo[-1 - every], hi[-1 - every])
        return abs(now - before) <= self.settle_tol * abs(now)

    def choose(self, lambda_min: float, lambda_max: float) -> float:
        """The damping for Hessian eigenvalue estimates ``lambda_min ≤ lambda_max`` (of ``H``, undamped)."""
        margin = max((self.safety - 1.0) * max(0.0, -lambda_min), self.floor * abs(lambda_max))
        return float(max(self.base, -lambda_min + margin))

    @classmethod
    def from_optimizer(cls, optimizers: Union["torch.optim.Optimizer", Sequence["torch.optim.Optimizer"]],
                       params: Optional[Iterable[Any]] = None, **kwargs: Any) -> "AutoDamping":
        """The automatic damping for a model trained by ``optimizers``: ``base`` is their coupled L2
        coefficient on ``params`` (default: every parameter they update), see :func:`optimizer_l2`.

        Example:
            >>> import torch
            >>> w = torch.nn.Parameter(torch.zeros(3))
            >>> AutoDamping.from_optimizer(torch.optim.SGD([w], lr=0.1, weight_decay=0.01)).base
            0.01
            >>> AutoDamping.from_optimizer(torch.optim.AdamW([w], weight_decay=0.01)).base
            0.0
        """
        opts = [optimizers] if not isinstance(optimizers, (list, tuple)) else list(optimizers)
        chosen = list(params) if params is not None else [p for o in opts for g in o.param_groups for p in g["params"]]
        l2, reason = optimizer_l2(opts, chosen)
        return cls(base=l2 or 0.0, source=reason, **kwargs)


@dataclass(frozen=True)
class FixedDamping:
    """A fixed ``λ`` with where it came from (``float(spec)`` is ``λ``); a plain number is one ``"set by
    the user"``. The callback's ``damping=None`` passes the optimizer's L2 coefficient this way."""

    value: float
    source: str = "set by the user"

    def __float__(self) -> float:
        return float(self.value)


DampingSpec = Union[float, FixedDamping, AutoDamping]


def optimizer_l2(optimizers: Sequence[Any], params: Sequence[Any]) -> Tuple[Optional[float], str]:
    """The coupled L2 coefficient the optimizers applied to ``params``: the ``λ`` its penalty adds to the
    Hessian, or ``None`` when there is none, with a short reason.

    Coupled weight decay (SGD, Adam, …) adds ``wd·θ`` to the gradient, i.e. ``wd/2·‖θ‖²`` to the loss,
    whose Hessian is ``wd·I``: ``λ = wd``. Decoupled decay (AdamW, ``decoupled_weight_decay=True``) is not
    a term of the loss, so it gives none; nor does no decay at all, or an unknown optimizer. Parameters
    with different decays give the smallest, with a warning.
    """
    import warnings

    import torch

    wanted = {id(p) for p in params}
    decays: List[float] = []
    kinds = set()
    for opt in optimizers:
        name = type(opt).__name__
        for group in opt.param_groups:
            if not any(id(p) in wanted for p in group["params"]):
                continue
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            decoupled = isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
            if wd > 0 and not decoupled and name in _COUPLED_L2:
                decays.append(wd)
                kinds.add(name)
            elif wd > 0:
                return None, f"{name} weight decay is decoupled or unknown (not an L2 term)"
            else:
                decays.append(0.0)
    if not any(d > 0 for d in decays):
        return None, "no L2 weight decay"
    if len(set(decays)) > 1:
        warnings.warn(
            f"The attributed parameters have different L2 weight decays {sorted(set(decays))}; the Hessian "
            f"damping uses the smallest, {min(decays):g}. Pass damping= to choose.", UserWarning, stacklevel=3)
    if min(decays) == 0:
        return None, "some attributed parameters have no L2 weight decay"
    return min(decays), f"{'/'.join(sorted(kinds))} weight_decay (coupled L2)"


def optimizer_damping(optimizers: Sequence[Any], params: Sequence[Any]) -> Tuple[float, str]:
    """The fixed damping of ``damping=None``: the optimizers' coupled L2 coefficient on ``params``
    (:func:`optimizer_l2`), else :data:`DEFAULT_DAMPING`, and why (recorded as the damping's source)."""
    lam, reason = optimizer_l2(optimizers, params)
    return (DEFAULT_DAMPING, f"{reason}; default damping") if lam is None else (lam, reason)


def damping_for_optimizers(damping: Union[None, float, str, AutoDamping, FixedDamping], optimizers: Sequence[Any],
                           params: Sequence[Any], solver: str) -> DampingSpec:
    """The damping of a model trained by ``optimizers`` (the callback's ``damping=`` argument): ``"auto"``:
    :meth:`AutoDamping.from_optimizer` on ``params``, raised by ``solver``'s damping rule where the curvature
    needs it; ``None``: exactly :func:`optimizer_damping`; anything else: exactly what was given
    (:func:`resolve_damping`). The source says which, so the run record tells where λ came from.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> sgd = torch.optim.SGD([w], lr=0.1, weight_decay=0.01)
        >>> damping_for_optimizers(None, [sgd], [w], "cg")
        FixedDamping(value=0.01, source='SGD weight_decay (coupled L2)')
        >>> damping_for_optimizers("auto", [sgd], [w], "cg").base
        0.01
    """
    if damping is None:
        return FixedDamping(*optimizer_damping(optimizers, params))
    if isinstance(damping, str) and damping == "auto":
        auto = AutoDamping.from_optimizer(list(optimizers), params)
        return AutoDamping(base=auto.base, source=f"auto: {auto.source}, plus what the curvature needs (the "
                           f"{solver} solver's damping rule)")
    spec = resolve_damping(damping)
    if isinstance(spec, AutoDamping):
        return AutoDamping(**{**vars(spec), "source": spec.source or "AutoDamping set by the user: from the curvature"})
    return spec


def resolve_damping(damping: Union[float, str, AutoDamping, FixedDamping], source: str = "") -> DampingSpec:
    """Validate a damping argument: a finite number ``≥ 0``, ``"auto"``, an :class:`AutoDamping` or a
    :class:`FixedDamping`."""
    if isinstance(damping, AutoDamping):
        return damping
    if isinstance(damping, FixedDamping):
        resolve_damping(damping.value)
        return damping
    if isinstance(damping, str):
        if damping == "auto":
            return AutoDamping(source=source)
        raise InfluenceConfigError(f'damping={damping!r} must be a number ≥ 0, "auto" or AutoDamping(...).')
    if not is_real(damping) or not (0 <= float(damping) < math.inf):
        raise InfluenceConfigError(
            f'damping={damping!r} must be a finite number ≥ 0 (it is added to the Hessian as λI), or "auto".'
        )
    return float(damping)


# --------------------------------------------------------------------------------------------- spectrum
@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalue estimates of the (undamped) curvature a solver inverts, and their cost.

    Attributes:
        lambda_min / lambda_max: smallest and largest eigenvalue estimates (Hessian units).
        passes: full-data Hessian-vector products spent (each a sweep over ``examples`` examples); 0 for
            exact eigenvalues or a factored approximation's.
        examples: training examples the estimate saw (``None``: all).
        mean: the mean eigenvalue, where known (a factored approximation's).
        of: what it is the spectrum of (``"H"``, ``"H (dense, exact)"``, ``"EK-FAC Fisher"``, …).
    """

    lambda_min: float
    lambda_max: float
    passes: int = 0
    examples: Optional[int] = None
    mean: Optional[float] = None
    of: str = "H"


@dataclass
class HessianKrylov:
    """A Lanczos run on the Hessian of ``problem`` (the training set, or a random subset of it) and the
    extreme eigenvalues it gave: the damping rule reads :attr:`spectrum`, and a low-rank inverse on the
    same subset extends :attr:`lanczos` instead of starting again (``key`` says which subset)."""

    spectrum: Spectrum
    lanczos: Lanczos
    problem: "InfluenceProblem"
    key: Tuple[Optional[int], int]


def estimate_spectrum(problem: "InfluenceProblem", iters: int = 60, seed: int = 0,
                      max_examples: Optional[int] = None,
                      stop: Optional[Callable[[List[float], List[float]], bool]] = None) -> HessianKrylov:
    """``λ_min(H)`` and ``λ_max(H)`` by ``iters`` steps of Lanczos (full reorthogonalisation) on the
    Hessian of the mean loss over the training set, or over at most ``max_examples`` of its examples drawn
    from ``seed``; ``stop(lo, hi)`` may end it sooner (e.g. :meth:`AutoDamping.settled`). The run is
    returned for reuse."""
    seen = problem if max_examples is None else problem.subsample(max_examples, seed)
    op = seen.operator
    lo, hi, lz = lanczos_run(op.full_hvp, op.num_params, dtype=op.dtype, device=op.device, iters=iters, seed=seed,
                             stop=stop)
    spectrum = Spectrum(lo[-1], hi[-1], lz.steps, seen.num_examples if seen is not problem else None)
    return HessianKrylov(spectrum, lz, seen, (None if seen is problem else int(max_examples or 0), int(seed)))


# --------------------------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class DampingChoice:
    """The damping of one run: the only record of ``λ`` (``results.record.damping``).

    Attributes:
        value: ``λ`` (Hessian units), added to the curvature the solver inverts.
        mode: ``"fixed"`` (as given) or ``"auto"`` (chosen by the rule).
        rule: how an automatic ``λ`` was chosen (the formula), or ``"fixed"``.
        source: where the fixed value or the automatic rule's base came from.
        base: the automatic rule's floor (``None`` for a fixed damping).
        spectrum: the curvature estimate the rule read or checked (``None`` when none was measured).
        auto: the automatic settings it came from (not stored with the results), so that a solver whose
            estimate grows later can apply the same rule again (:meth:`raised_to`).
    """

    value: float
    mode: str
    rule: str = "fixed"
    source: str = ""
    base: Optional[float] = None
    spectrum: Optional[Spectrum] = None
    auto: Optional[AutoDamping] = field(default=None, compare=False, repr=False)

    def flat(self) -> Dict[str, Any]:
        """The record's flat keys (``damping``, ``damping_mode``, …); absent values are left out."""
        out: Dict[str, Any] = {"damping": self.value, "damping_mode": self.mode, "damping_rule": self.rule}
        if self.source:
            out["damping_source"] = self.source
        if self.base is not None:
            out["damping_base"] = self.base
        sp = self.spectrum
        if sp is not None:
            out.update(lambda_min_estimate=sp.lambda_min, lambda_max_estimate=sp.lambda_max, spectrum_passes=sp.passes,
                       spectrum_of=sp.of)
            if sp.examples is not None:
                out["spectrum_examples"] = sp.examples
            if sp.mean is not None:
                out["mean_eigenvalue"] = sp.mean
        return out

    def to_dict(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in ("value", "mode", "rule", "source", "base")}
        out["spectrum"] = None if self.spectrum is None else dict(vars(self.spectrum))
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DampingChoice":
        sp = d.get("spectrum")
        return cls(float(d["value"]), str(d["mode"]), str(d.get("rule", "fixed")), str(d.get("source", "")),
                   d.get("base"), None if sp is None else Spectrum(**sp))

    @classmethod
    def from_flat(cls, flat: Dict[str, Any]) -> Optional["DampingChoice"]:
        """The choice recorded in an old flat ``settings`` dict, or ``None`` without a ``damping`` key."""
        if "damping" not in flat:
            return None
        sp = None
        if "lambda_min_estimate" in flat and "lambda_max_estimate" in flat:
            sp = Spectrum(float(flat["lambda_min_estimate"]), float(flat["lambda_max_estimate"]),
                          int(flat.get("spectrum_passes", 0)), flat.get("spectrum_examples"), flat.get("mean_eigenvalue"),
                          str(flat.get("spectrum_of", "H")))
        return cls(float(flat["damping"]), str(flat.get("damping_mode", "fixed")), str(flat.get("damping_rule", "fixed")),
                   str(flat.get("damping_source", "")), flat.get("damping_base"), sp)

    def refined(self, spectrum: Spectrum, why: str) -> "DampingChoice":
        """An automatic choice after a later, wider estimate ``spectrum`` (a Krylov space that grew): the
        same rule applied to it, raised when it needs more damping (``why`` is recorded), else the same
        ``λ`` with the newer spectrum. A fixed choice keeps its value."""
        if self.mode != "auto" or self.auto is None:
            return replace(self, spectrum=spectrum)
        need = self.auto.choose(spectrum.lambda_min, spectrum.lambda_max)
        if need > self.value * (1 + 1e-9):
            return replace(self, value=float(need), spectrum=spectrum, rule=f"{self.rule}; {why}")
        return replace(self, spectrum=spectrum)


class DampingRule:
    """Turns the damping argument and the measured curvature into a :class:`DampingChoice`."""

    #: what the rule needs measured before it can choose: ``"hessian"`` (extreme eigenvalues of ``H``) or
    #: ``"approximation"`` (the solver's own fitted curvature)
    needs: str = "hessian"

    def choose(self, spec: DampingSpec, spectrum: Optional[Spectrum], solver: str = "") -> DampingChoice:
        raise NotImplementedError


@dataclass(frozen=True)
class SpectrumRule(DampingRule):
    """The rule of the solvers that invert ``H`` itself (see the module docstring). ``check``: a fixed
    ``λ`` with a known spectrum raises :class:`NegativeCurvatureError` when ``H + λI`` is indefinite."""

    check: bool = True
    needs = "hessian"

    def choose(self, spec: DampingSpec, spectrum: Optional[Spectrum], solver: str = "") -> DampingChoice:
        if not isinstance(spec, AutoDamping):
            lam = float(spec)
            if self.check and spectrum is not None:
                check_curvature(spectrum, lam, solver)
            return DampingChoice(lam, "fixed", "fixed", _source(spec), None, spectrum)
        if spectrum is None:
            raise InfluenceConfigError("automatic damping needs a curvature estimate; none was measured.")
        lam = spec.choose(spectrum.lambda_min, spectrum.lambda_max)
        return DampingChoice(lam, "auto", f"max(base, −λ_min(H) + margin), safety={spec.safety:g}, floor={spec.floor:g}",
                             spec.source or "automatic", float(spec.base), spectrum, spec)


@dataclass(frozen=True)
class FactoredRule(DampingRule):
    """The rule of the Kronecker-factored solvers: ``λ = max(base, fraction · mean eigenvalue)`` of the
    approximation; a fixed ``λ`` must keep the approximation non-singular."""

    fraction: float = 0.1
    needs = "approximation"

    def choose(self, spec: DampingSpec, spectrum: Optional[Spectrum], solver: str = "") -> DampingChoice:
        if spectrum is None:
            raise InfluenceConfigError(f"solver={solver!r}: its damping rule needs the fitted curvature.")
        if isinstance(spec, AutoDamping):
            lam = max(float(spec.base), self.fraction * float(spectrum.mean or 0.0))
            choice = DampingChoice(lam, "auto", f"max(base, {self.fraction:g} × mean eigenvalue)",
                                   spec.source or "automatic", float(spec.base), spectrum, spec)
        else:
            choice = DampingChoice(float(spec), "fixed", "fixed", _source(spec), None, spectrum)
        if not (choice.value + spectrum.lambda_min > 0):
            raise InfluenceConfigError(
                f"damping={choice.value:g} leaves Ĥ + λI singular: the {solver} curvature has eigenvalue "
                f"{spectrum.lambda_min:.3g} (directions no training example moves). Use damping > 0, or damping='auto'."
            )
        return choice


def _source(spec: DampingSpec) -> str:
    return spec.source if isinstance(spec, FixedDamping) else "set by the user"


def check_curvature(spectrum: Spectrum, damping: float, solver: str) -> None:
    """Raise :class:`NegativeCurvatureError` when ``H + λI`` has a non-positive eigenvalue estimate,
    naming the damping that would fix it (what ``AutoDamping(base=damping)`` would choose)."""
    if spectrum.lambda_min + damping > 0:
        return
    need = AutoDamping(base=float(damping)).choose(spectrum.lambda_min, spectrum.lambda_max)
    raise NegativeCurvatureError(
        f"H + λI is not positive definite: the smallest Hessian eigenvalue is estimated at "
        f"{spectrum.lambda_min:.4g} (Lanczos, {spectrum.passes} full-data HVPs), so with damping λ={damping:g} the curvature "
        f"is {spectrum.lambda_min + damping:.3g} along some direction and solver={solver!r} cannot give "
        f"meaningful influence (the trained weights are not at a minimum). Fix: damping ≥ {need:.3g}, or "
        "damping='auto' (chooses it), or train closer to convergence."
    )
