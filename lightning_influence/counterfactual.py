"""Counterfactual models: the parameters, and the predictions, of the model retrained without chosen
training examples, predicted by influence functions (Koh & Liang, 2017, §2.1) instead of retraining.

Definitions (``n`` training examples, ``R(θ) = (1/n) Σ_i L(z_i, θ)``, trained parameters ``θ̂``):

* ``H = ∇²R(θ̂) + λI``: the Hessian of the mean training loss plus the damping ``λ`` (Hessian units), as in
  :func:`~lightning_influence.pipeline.compute_influence`. For a model trained on ``R(θ) + (λ/2)‖θ‖²``
  (coupled L2 / weight decay ``λ``) the damping is that ``λ`` and ``H`` is the exact Hessian of the
  training objective.
* ``I_up,params(z) = dθ̂_{ε,z}/dε |_{ε=0} = −H⁻¹∇L(z, θ̂)``, where ``θ̂_{ε,z}`` minimises
  ``R(θ) + (λ/2)‖θ‖² + ε·L(z, θ)``: parameter units per unit of the weight ``ε`` on ``z``'s loss
  (``ε = 1/n`` adds one more copy of ``z``).
* Removing a group ``G`` is upweighting each of its examples by ``ε = −1/n``: the retrained parameters
  ``θ̂₋G`` minimise ``(1/n) Σ_{i∉G} L(z_i, θ) + (λ/2)‖θ‖²`` (the same ``1/n``; retraining on the *mean* of
  the remaining ``n − |G|`` examples also rescales the L2 term, a different counterfactual), and

  ``Δθ = θ̂₋G − θ̂ ≈ −(1/n) Σ_{z∈G} I_up,params(z) = (1/n) H⁻¹ Σ_{z∈G} ∇L(z, θ̂)``

  (one Newton step from ``θ̂`` on the objective without ``G``: exact for a quadratic loss, first order
  in ``|G|/n`` otherwise).

The group's gradient sum is one right-hand side; several examples taken one at a time are solved as
one batch of right-hand sides. The solver is fitted once per :class:`Counterfactual`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import jvp
from torch.utils.data import Dataset

from .checks import check_positive_int, is_int
from .curvature.damping import AutoDamping, resolve_damping
from .data import Collate, ExampleSource
from .diagnostics import Diagnostic
from .errors import InfluenceConfigError
from .functional import batch_size_of
from .guards import preserved_rng
from .objective import IGNORE_INDEX, LossFn
from .pipeline import bind, fit_inverse, frozen_module, solve_queries
from .problem import InfluenceProblem
from .scoring import checked_grads
from .solvers import InverseHVP, SolverSettings, resolve_solver
from .validation import check_query_indices, check_run_arguments

__all__ = ["Counterfactual", "PredictedMetrics"]

#: training examples as positions in the training dataset: one integer, a sequence, or a 1-D integer
#: tensor or array
Indices = Union[int, Sequence[int], Tensor, Any]

#: group solves kept per :class:`Counterfactual` (``model_without`` and ``predicted_metrics`` of the same
#: group reuse the solve of ``parameter_change``)
_CACHE_SIZE = 16


@dataclass(frozen=True)
class PredictedMetrics:
    """Validation metrics of the trained model and of the predicted model without a group of examples.

    Losses are the mean per-example loss of the influence objective (nats for the default
    cross-entropy); accuracies are fractions in ``[0, 1]`` (``None`` when the loss is an
    ``influence_loss`` hook or the outputs are not ``[B, C]`` logits with integer labels).

    Attributes:
        num_removed: ``|G|``, the training examples removed.
        num_examples: validation examples evaluated.
        loss_before: at the trained parameters ``θ̂``.
        loss_after: at the predicted parameters ``θ̂ + Δθ`` (the model of :meth:`Counterfactual.model_without`).
        loss_change_first_order: ``∇L_valᵀ Δθ``, the linear prediction; it equals the mean over the
            validation examples of ``−(1/n) Σ_{z∈G} I_up,loss(z, z_val)``, what summing the scores of
            :func:`~lightning_influence.pipeline.compute_influence` predicts.
        accuracy_before / accuracy_after: top-1 accuracy at ``θ̂`` and ``θ̂ + Δθ``.
    """

    num_removed: int
    num_examples: int
    loss_before: float
    loss_after: float
    loss_change_first_order: float
    accuracy_before: Optional[float]
    accuracy_after: Optional[float]

    @property
    def loss_change(self) -> float:
        """``loss_after − loss_before``: positive = removing the group is predicted to hurt."""
        return self.loss_after - self.loss_before

    @property
    def accuracy_change(self) -> Optional[float]:
        """``accuracy_after − accuracy_before`` (fraction), or ``None``."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return self.accuracy_after - self.accuracy_before

    def to_dict(self) -> Dict[str, Any]:
        """Every field and both changes, as plain numbers (for a logger's summary or a table row)."""
        return {**asdict(self), "loss_change": self.loss_change, "accuracy_change": self.accuracy_change}


class Counterfactual:
    """Predicted parameters and predictions of a model retrained without chosen training examples.

    Binds the objective and fits ``(H + λI)⁻¹`` once (the parameters ``θ̂`` are a snapshot taken here);
    every method then costs per-example gradients of the chosen examples and one batched solve. The
    model is never modified: it is evaluated in eval mode with autocast off, and the global random
    states are restored after each call.

    Args:
        model: the trained model (any ``nn.Module``).
        train_dataset: the map-style dataset it was trained on; example ``i`` is its position ``i``.
        solver: ``"cg"`` (default: exact ``H + λI`` to ``tol``), ``"exact"`` (explicit Hessian, small
            models), ``"lissa"``, ``"arnoldi"``, ``"ekfac"``, ``"kfac"`` or a settings object, as in
            :func:`~lightning_influence.pipeline.compute_influence`.
        damping: ``λ ≥ 0`` added to the Hessian of the mean training loss (Hessian units): the L2
            coefficient for an L2-trained model, ``"auto"`` or an
            :class:`~lightning_influence.curvature.damping.AutoDamping` as in ``compute_influence``.
        loss_fn / params / collate_fn / dtype / chunk_size / grad_chunk_size: as in ``compute_influence``;
            ``params`` selects the parameters that change, every other parameter and buffer stays as trained.
        rhs_batch_size: right-hand sides solved together (default: all at once); the results do not
            depend on it.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> train = TensorDataset(torch.randn(50, 3), torch.randint(0, 2, (50,)))
        >>> cf = Counterfactual(torch.nn.Linear(3, 2), train, solver="exact", damping=0.1)
        >>> delta = cf.parameter_change([3, 17])          # {name: Tensor shaped like the parameter}
        >>> sorted(delta), tuple(delta["weight"].shape)
        (['bias', 'weight'], (2, 3))
        >>> fixed = cf.model_without([3, 17])             # a new module at θ̂ + Δθ; the model is untouched
        >>> type(fixed).__name__
        'Linear'
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        *,
        solver: Union[str, SolverSettings] = "cg",
        damping: Union[float, str, AutoDamping] = "auto",
        loss_fn: Optional[LossFn] = None,
        params: Optional[Union[str, Sequence[str]]] = None,
        collate_fn: Optional[Collate] = None,
        dtype: Union[torch.dtype, str] = torch.float32,
        chunk_size: int = 256,
        grad_chunk_size: Optional[int] = None,
        rhs_batch_size: Optional[int] = None,
    ) -> None:
        check_positive_int("rhs_batch_size", rhs_batch_size, allow_none=True)
        args = check_run_arguments(params=params, chunk_size=chunk_size, grad_chunk_size=grad_chunk_size,
                                   query_batch_size=rhs_batch_size, dtype=dtype)
        settings = resolve_solver(solver)
        damping_spec = resolve_damping(damping)
        if train_dataset is None:
            raise InfluenceConfigError("train_dataset is None; pass the map-style Dataset the model was trained on.")
        with preserved_rng(), frozen_module(model):
            problem = bind(model, train_dataset, args, loss_fn=loss_fn, collate_fn=collate_fn)
            settings.check_size(problem.num_params, args.dtype)
            inverse = fit_inverse(problem, settings, damping_spec)
        self._attach(model, problem, inverse, rhs_batch_size)

    @classmethod
    def from_fitted(cls, model: nn.Module, problem: InfluenceProblem, inverse: InverseHVP,
                    rhs_batch_size: Optional[int] = None) -> "Counterfactual":
        """Reuse a problem and an inverse from the public phases (:func:`~lightning_influence.pipeline.bind`,
        :func:`~lightning_influence.pipeline.fit_inverse`) of ``model``: no second fit. With a problem
        split over several processes, every process must make the same calls (the solves all-reduce)."""
        if inverse.problem is not problem:
            raise InfluenceConfigError("inverse was fitted to another problem; pass the problem it was fitted to "
                                       "(inverse.problem).")
        if problem.objective.module is not model:
            raise InfluenceConfigError("problem was bound to another model; pass the model given to bind().")
        self = cls.__new__(cls)
        self._attach(model, problem, inverse, rhs_batch_size)
        return self

    def _attach(self, model: nn.Module, problem: InfluenceProblem, inverse: InverseHVP,
                rhs_batch_size: Optional[int]) -> None:
        self.model = model
        self.problem = problem
        self.inverse = inverse
        self.rhs_batch_size = rhs_batch_size
        #: diagnostics of the latest solve, ``(start, stop, diagnostics)`` per batch of right-hand sides
        self.solve_diagnostics: List[Tuple[int, int, List[Diagnostic]]] = []
        self._cache: "OrderedDict[Tuple[int, ...], Tensor]" = OrderedDict()

    # ------------------------------------------------------------------ sizes and layout
    @property
    def num_train(self) -> int:
        """``n``: training examples (the ``1/n`` of the removal)."""
        return self.problem.num_examples

    @property
    def damping(self) -> float:
        """``λ`` used (Hessian units)."""
        return self.inverse.damping

    @property
    def param_names(self) -> Tuple[str, ...]:
        """Names of the parameters that change, as in ``model.named_parameters()``, in flat order."""
        return self.problem.objective.param_names

    def named(self, flat: Tensor) -> Dict[str, Tensor]:
        """Split flat vectors ``[..., P]`` into a dict keyed by parameter name, each ``[..., *shape]``."""
        return dict(zip(self.param_names, self.problem.space.unflatten(flat).values()))

    def flatten(self, named: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Inverse of :meth:`named`: ``[..., P]`` from a dict of ``[..., *shape]`` with ``batch_dims``
        leading dimensions."""
        space = self.problem.space
        return space.flatten({s: named[n] for s, n in zip(space.names, self.param_names)}, batch_dims)

    # ------------------------------------------------------------------ the maths
    def params_influence(self, indices: Indices, group: bool = False) -> Dict[str, Tensor]:
        """``I_up,params(z) = −(H + λI)⁻¹ ∇L(z, θ̂)`` keyed by parameter name.

        Args:
            indices: training examples (positions in the training dataset).
            group: ``False``: one value per example, each ``[k, *shape]`` in the order of ``indices``;
                ``True``: their sum ``−H⁻¹ Σ_{z∈G} ∇L(z)``, each ``[*shape]``.

        Returns:
            Parameter units per unit of upweighting ``ε`` (the weight on the example's loss next to the
            mean training loss), in the maths' dtype, on the parameters' device. Removing the examples
            changes the parameters by about ``−(1/n)`` times this (:meth:`parameter_change`).
        """
        idx = self._check(indices, group)
        with preserved_rng(), frozen_module(self.model):
            solved = self._group_solve(idx) if group else self._solve(self._grads(idx))
        return self.named(-solved[0] if group else -solved)

    def parameter_change(self, indices: Indices, group: bool = True) -> Dict[str, Tensor]:
        """Predicted ``θ̂₋G − θ̂ = (1/n)(H + λI)⁻¹ Σ_{z∈G} ∇L(z, θ̂)`` keyed by parameter name, each
        ``[*shape]`` (parameter units).

        Args:
            indices: the training examples removed together (``group=True``, no duplicates), or, with
                ``group=False``, each removed on its own: ``[k, *shape]``, one change per example.
        """
        delta = self._delta(self._check(indices, group), group)
        return self.named(delta[0] if group else delta)

    def model_without(self, indices: Indices) -> nn.Module:
        """A deep copy of the model with the predicted parameters ``θ̂ + Δθ`` of the model retrained
        without the group ``indices`` (cast to each parameter's dtype and device). Parameters outside
        ``params``, buffers and train/eval modes are copied as they are; the model itself is untouched."""
        delta = self._delta(self._check(indices, True), True)[0]
        new = self.problem.theta + delta
        clone = copy.deepcopy(self.model)
        own = dict(clone.named_parameters())
        with torch.no_grad():
            for name, value in self.named(new).items():
                own[name].copy_(value.to(dtype=own[name].dtype, device=own[name].device))
        return clone

    def predicted_metrics(self, indices: Indices, val_dataset: Dataset, *,
                          collate_fn: Optional[Collate] = None) -> PredictedMetrics:
        """Validation loss and accuracy before and after removing the group ``indices``, the model
        after being the predicted one (:meth:`model_without`), evaluated in the maths' dtype with
        ``torchmetrics`` (``MeanMetric``, ``MulticlassAccuracy`` ignoring the label ``−100``).

        Args:
            indices: the training examples removed together.
            val_dataset: map-style dataset of the same batch format as the training set.
            collate_fn: its collate function (default: ``default_collate``).
        """
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy

        idx = self._check(indices, True)
        delta = self._delta(idx, True)[0]
        objective = self.problem.objective
        theta = self.problem.theta
        after = theta + delta
        source = ExampleSource(val_dataset, collate_fn, objective.prepare_batch, what="validation")
        loss_fn = objective.loss
        space = self.problem.space
        means = [MeanMetric().to(theta.device).set_dtype(theta.dtype) for _ in range(3)]  # .to() resets the dtype
        accuracy: Optional[List[Any]] = None
        classify = not objective.uses_hook
        with preserved_rng(), frozen_module(self.model):
            for start, batch in source.chunks(self.problem.chunk_size):
                objective.check_targets(batch, source.indices[start : start + batch_size_of(batch)].tolist(),
                                        "validation")
                before_l, slope = jvp(lambda t: loss_fn(space.unflatten(t), batch), (theta,), (delta,))
                before_l, slope = before_l.detach(), slope.detach()
                after_l = objective.losses(batch, after)
                for metric, value in zip(means, (before_l, after_l, slope)):
                    metric.update(value)
                if not classify:
                    continue
                out_before, out_after = objective.outputs(batch), objective.outputs(batch, after)
                targets = batch[1]
                if (out_before is None or out_before.dim() != 2 or not isinstance(targets, Tensor)
                        or targets.dim() != 1 or targets.is_floating_point()):
                    classify = False
                    continue
                if accuracy is None:
                    accuracy = [MulticlassAccuracy(num_classes=out_before.shape[1], ignore_index=IGNORE_INDEX,
                                                   average="micro").to(theta.device).set_dtype(theta.dtype)
                                for _ in range(2)]
                accuracy[0].update(out_before, targets)
                accuracy[1].update(out_after, targets)
        acc = [float(a.compute()) for a in accuracy] if classify and accuracy is not None else [None, None]
        return PredictedMetrics(
            num_removed=len(idx),
            num_examples=len(source),
            loss_before=float(means[0].compute()),
            loss_after=float(means[1].compute()),
            loss_change_first_order=float(means[2].compute()),
            accuracy_before=acc[0],
            accuracy_after=acc[1],
        )

    # ------------------------------------------------------------------ internals
    def _check(self, indices: Indices, group: bool) -> Tuple[int, ...]:
        """Positions in the training dataset as a tuple; raises :class:`InfluenceConfigError` naming
        ``indices`` for anything else, out-of-range positions and (for a group) repeats."""
        if is_int(indices):
            indices = [indices]
        out = check_query_indices(indices, name="indices", where="the training dataset",
                                  duplicates="error" if group else "warn")
        if out is None:
            raise InfluenceConfigError("indices=None; pass positions in the training dataset, e.g. indices=[0, 5, 17].")
        n = self.num_train
        bad = [i for i in out if i >= n]
        if bad:
            raise InfluenceConfigError(
                f"indices {bad[:5]} are out of range for the training dataset of {n} examples; pass positions "
                f"0..{n - 1}."
            )
        return out

    def _delta(self, idx: Tuple[int, ...], group: bool) -> Tensor:
        """Flat predicted changes ``[1, P]`` (group) or ``[k, P]`` (each example alone) for checked ``idx``."""
        with preserved_rng(), frozen_module(self.model):
            solved = self._group_solve(idx) if group else self._solve(self._grads(idx))
        return solved / self.num_train

    def _grads(self, idx: Sequence[int], total: bool = False) -> Tensor:
        """``∇L(z_i, θ̂)`` for the examples ``idx`` ``[k, P]`` in that order, or their sum ``[1, P]``."""
        problem = self.problem
        source = problem.train.subset(list(idx))
        parts: List[Tensor] = []
        for start, batch in source.chunks(problem.grad_chunk_size):
            g = checked_grads(problem.objective.loss, problem.space, problem.theta, batch, "training", start,
                              indices=source.indices, plan=problem.objective.differentiation)
            parts.append(g.sum(0, keepdim=True) if total else g)
        out = torch.cat(parts)
        return out.sum(0, keepdim=True) if total else out

    def _solve(self, rhs: Tensor) -> Tensor:
        solved = solve_queries(self.inverse, rhs, self.rhs_batch_size)
        self.solve_diagnostics = solved.chunks
        return solved.s_test

    def _group_solve(self, idx: Tuple[int, ...]) -> Tensor:
        """``(H + λI)⁻¹ Σ_{z∈G} ∇L(z)`` ``[1, P]``, cached by the (unordered) group."""
        key = tuple(sorted(idx))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        solved = self._solve(self._grads(idx, total=True))
        self._cache[key] = solved
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return solved
