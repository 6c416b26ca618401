"""``InfluenceCallback``: compute influence functions when ``trainer.fit`` ends.

Orchestration only: argument checks, where the data and the model are, which damping the optimizer
implies, error containment and the hand-off to reporters. The maths lives in :mod:`pipeline`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from .checks import is_int
from .data import check_map_dataset
from .distributed import Communicator
from .errors import InfluenceConfigError, InfluenceInterrupted, InfluenceRuntimeError
from .guards import interruptible, preserved_rng
from .objective import LossFn, select_params
from .damping import AutoDamping, resolve_damping
from .persistence import tensor_checksum
from .pipeline import DEFAULT_DAMPING, ProgressFn, compute_influence, preflight
from .results import InfluenceResults
from .solvers import SolverSettings, resolve_solver
from .strategy import check_strategy, communicator_for
from .validation import check_positive_int, check_run_arguments, check_writable_file

__all__ = ["InfluenceCallback", "InfluenceCallbackBase", "OnResults", "optimizer_damping", "optimizer_l2"]

#: ``on_results(trainer, pl_module, results)``, called after each influence computation on every rank
OnResults = Callable[["pl.Trainer", "pl.LightningModule", InfluenceResults], None]
#: version of what :meth:`InfluenceCallbackBase.state_dict` returns
_STATE_FORMAT = 1

#: optimizers whose ``weight_decay`` adds ``wd·θ`` to the gradient (an L2 term ``wd/2·‖θ‖²`` in the loss)
_COUPLED_L2 = ("SGD", "Adam", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD")
_AVERAGING_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")
#: solvers that compute self-influence by solving every training gradient as a right-hand side
_SOLVED_SELF_INFLUENCE = ("lissa", "cg")


def optimizer_l2(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.nn.Parameter]
) -> Tuple[Optional[float], str]:
    """The coupled L2 coefficient the optimizer applied to ``params``: the ``λ`` its penalty adds to the
    Hessian, or ``None`` when there is none.

    Coupled weight decay (SGD, Adam, …) adds ``wd·θ`` to the gradient, i.e. ``wd/2·‖θ‖²`` to the loss,
    whose Hessian is ``wd·I``: ``λ = wd``. Decoupled decay (AdamW, ``decoupled_weight_decay=True``) is not
    a term of the loss, so it gives none; nor does no decay at all, or an unknown optimizer.

    Returns:
        ``(λ or None, reason)``, the reason being a short human-readable explanation.
    """
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
        rank_zero_warn(
            f"The attributed parameters have different L2 weight decays {sorted(set(decays))}; the Hessian "
            f"damping uses the smallest, {min(decays):g}. Pass damping= to InfluenceCallback to choose."
        )
    if min(decays) == 0:
        return None, "some attributed parameters have no L2 weight decay"
    return min(decays), f"{'/'.join(sorted(kinds))} weight_decay (coupled L2)"


def optimizer_damping(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.nn.Parameter]
) -> Tuple[float, str]:
    """The damping ``λ`` the optimizer implies for ``params``: its coupled L2 coefficient
    (:func:`optimizer_l2`), else :data:`~lightning_influence.pipeline.DEFAULT_DAMPING`.

    Returns:
        ``(λ, reason)``, the reason being recorded with the results.
    """
    lam, reason = optimizer_l2(optimizers, params)
    if lam is None:
        return DEFAULT_DAMPING, f"{reason}; default damping"
    return lam, reason


class InfluenceCallbackBase:
    """Scores every training example's influence on chosen validation predictions when training ends.

    The implementation shared by both Lightning namespaces: :class:`InfluenceCallback` is this class on
    ``pytorch_lightning.Callback``, ``lightning_influence.lightning.InfluenceCallback`` the same on
    ``lightning.pytorch.Callback``, so that each namespace's ``LightningCLI`` accepts its own.

    Scores are Koh & Liang's ``I_up,loss(z_train, z_query) = −∇L(z_query)ᵀ (H + λI)⁻¹ ∇L(z_train)``:
    **positive = harmful** (removing the example would lower the query's loss), **negative = helpful**.
    ``H`` is the Hessian of the mean training loss at the trained weights; ``λ`` is the damping.

    It runs in ``on_train_end`` (and, with ``every_n_epochs``, in ``on_train_epoch_end``), on the device
    Lightning trained on, in ``dtype`` with autocast off, with the module in eval mode; the module's
    weights, gradients, modes and ``requires_grad`` flags, the optimizer's state and the global random
    states are unchanged afterwards, so training goes on exactly as without the callback. Training
    examples are indexed by their position in the training *dataset*.

    Args:
        num_queries: how many validation examples to explain; by default those with the highest loss.
        query_indices: explicit positions in the query dataset (overrides ``num_queries``).
        query_dataloader: where queries come from (default: the trainer's validation dataloader).
        solver: ``"lissa"`` (default: LiSSA preconditioned by a low-rank Arnoldi approximation),
            ``"arnoldi"``, ``"ekfac"``, ``"kfac"``, ``"cg"``, ``"exact"`` or a settings object such as
            ``LissaSettings(preconditioner=None)``; see the README's solver table.
        damping: the ``λ`` added to the Hessian, in Hessian units. ``"auto"`` (default): the
            optimizer's coupled L2 ``weight_decay`` (SGD, Adam; 0 for AdamW or no decay), raised by the
            solver's own rule when needed: for the Hessian-vector-product solvers when the Hessian's most
            negative eigenvalue needs more (a Lanczos estimate, from the preconditioner's Krylov space
            by default), so networks stopped short of a strict minimum still get a positive definite
            ``H + λI``; see :class:`~lightning_influence.damping.AutoDamping`. For EK-FAC/K-FAC a fraction
            of the approximation's mean eigenvalue. A number: exactly that ``λ ≥ 0``.
            ``None``: exactly the optimizer's coupled L2, else
            :data:`~lightning_influence.pipeline.DEFAULT_DAMPING`. The ``λ`` used and why are in
            ``results.settings`` (``damping``, ``damping_source``).
        params: names or prefixes of the parameters to attribute to (default: all trainable ones), e.g.
            ``["classifier"]`` for the last layer of a large network.
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` for ``(inputs, targets)`` batches (default
            per-example cross-entropy). A LightningModule defining ``influence_loss(batch)`` overrides it.
        top_k: examples per query in reports.
        self_influence: also compute ``I_up,loss(z, z)`` for every training example (likely mislabelled).
            Free with ``"arnoldi"``, ``"ekfac"`` or ``"kfac"`` (in the scoring pass); with ``"lissa"`` or
            ``"cg"`` every training gradient is solved as a right-hand side, usually the largest part of
            the cost (a line at setup says so; figures in the README).
        chunk_size: training examples per per-sample-gradient chunk (memory vs speed; results unchanged).
        query_batch_size: queries solved together (default all; results unchanged).
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the influence maths, or their names
            ``"float32"``/``"float64"``; half precision is refused.
        on_error: ``"warn"`` (default): a failure of the influence computation is reported as a warning
            and ``error`` is set, so training and its checkpoints are unaffected; ``"raise"`` re-raises.
            Each output (results file, HTML report, W&B) fails on its own, the others are still written
            and ``results`` is kept. A first Ctrl+C during the influence phase stops it (whatever
            ``on_error``): ``error`` is an :class:`~lightning_influence.errors.InfluenceInterrupted` and
            training goes on to end normally; a second Ctrl+C is handled as usual.
        save_results: write the results file (``influence/results.pt`` under the trainer's log dir),
            atomically: a failed write keeps the previous file.
        report: hand the results to the reporters (loggers, W&B, HTML).
        report_path: path of the HTML report (default: ``influence/report.html`` under the log dir).
        render_example: ``render_example(example) -> value`` for report previews (e.g. a ``wandb.Image``).
        every_n_epochs: also compute influence at the end of every ``k``-th training epoch (epochs
            ``k-1, 2k-1, …``, 0-based), in ``on_train_epoch_end``: after that epoch's validation, so the
            default queries come from the validation loader, and before ``ModelCheckpoint`` saves, so
            its checkpoint holds the run. ``None`` (default): only when training ends. Each run is kept
            in ``history`` and written to ``influence/results_epoch{k}.pt``; its scalars go to every
            logger at that step (with ``influence/epoch``), and from the second run on the W&B run gets
            the ``influence/over_epochs`` table. The end-of-training run still happens and writes
            ``results.pt``, the HTML report (with an "Across epochs" section) and the W&B tables; it
            reuses the last epoch's results instead of recomputing when the weights are bit-identical to
            those that run saw (same global step and state-dict checksum; an averaging callback that swaps
            weights in at the end makes it recompute).
        on_results: ``on_results(trainer, pl_module, results)``, called after each computation (every
            epoch run and the end-of-training run, not for reused results), on every rank, once the
            outputs are written: to act inside the loop, e.g. down-weight the self-influence suspects for
            the next epochs. An exception in it is handled as a failure of the computation (``on_error``).

    The callback's ``state_dict`` (saved in Lightning checkpoints) holds ``history`` as plain tensors
    and data (:meth:`InfluenceResults.to_state`: per run ``scores`` ``[Q, N]``, ``self_influence``
    ``[N]``, the ``[N]`` int64 training indices, a few ``[Q]`` vectors, settings and diagnostics: about
    ``(4·(Q+1) + 8)·N`` bytes per run in float32, e.g. 16 queries × 50,000 examples: 3.8 MB per run;
    ``(8·(Q+1) + 8)·N`` in float64), the results files' paths and the
    fingerprint of the weights the last run saw. A fit resumed with ``ckpt_path=`` gets them back; a
    fresh fit starts with an empty ``history``.

    Where the data allow it, misconfiguration is refused before the first training step (in ``setup``
    and ``on_train_start``): parameters, the solver's size limit, the training and query data (format,
    labels, a finite loss on a few examples, ``query_indices`` in range) and whether the outputs can be
    written. The global random states are restored after the influence phase, so training and what
    follows draw the same random numbers as without the callback.

    Attributes:
        results: the :class:`InfluenceResults` of the latest run: after training, the end-of-training
            run's (``None`` before, or on failure of the computation; kept when only an output failed).
        history: ``{epoch: InfluenceResults}`` of every run of the fit, keyed by the 0-based epoch whose
            trained weights it explains (the end-of-training run under the last epoch trained).
        history_paths: ``{epoch: path}`` of the per-epoch results files (``every_n_epochs`` runs).
        error: the exception that stopped the latest run, or the first output that failed, when
            ``on_error="warn"``.
        errors: ``{epoch: exception}``, ``error`` of every run of the fit that had one.
        output_errors: ``{output: exception}`` for each output of the latest run that could not be written.
        results_path: where global rank zero saved the latest run's results (set on every rank).
        outputs: what the reporters wrote for the latest run (paths, W&B run and artifact), on global
            rank zero.
    """

    def __init__(
        self,
        num_queries: int = 16,
        *,
        query_indices: Optional[Sequence[int]] = None,
        query_dataloader: Optional[DataLoader] = None,
        solver: Union[Literal["lissa", "cg", "exact", "ekfac", "kfac", "arnoldi"], SolverSettings] = "lissa",
        damping: Optional[Union[float, Literal["auto"], AutoDamping]] = "auto",
        params: Optional[Union[str, Sequence[str]]] = None,
        loss_fn: Optional[LossFn] = None,
        top_k: int = 10,
        self_influence: bool = False,
        chunk_size: int = 256,
        query_batch_size: Optional[int] = None,
        dtype: Union[torch.dtype, Literal["float32", "float64"]] = torch.float32,
        on_error: Literal["warn", "raise"] = "warn",
        save_results: bool = True,
        report: bool = True,
        report_path: Optional[Union[str, os.PathLike]] = None,
        render_example: Optional[Callable[[Any], Any]] = None,
        every_n_epochs: Optional[int] = None,
        on_results: Optional[OnResults] = None,
    ) -> None:
        args = check_run_arguments(num_queries=num_queries, query_indices=query_indices, params=params,
                                   chunk_size=chunk_size, query_batch_size=query_batch_size, dtype=dtype)
        check_positive_int("top_k", top_k)
        if query_dataloader is not None and not isinstance(query_dataloader, DataLoader):
            raise InfluenceConfigError(
                f"query_dataloader must be a torch DataLoader, got {type(query_dataloader).__name__}."
            )
        if on_error not in ("warn", "raise"):
            raise InfluenceConfigError(f"on_error={on_error!r} must be 'warn' or 'raise'.")
        if damping is not None:
            resolve_damping(damping)
        if loss_fn is not None and not callable(loss_fn):
            raise InfluenceConfigError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(outputs, targets) -> Tensor[B].")
        if render_example is not None and not callable(render_example):
            raise InfluenceConfigError("render_example must be callable: render_example(example) -> value.")
        if every_n_epochs is not None and not (is_int(every_n_epochs) and every_n_epochs >= 1):
            raise InfluenceConfigError(
                f"every_n_epochs={every_n_epochs!r} must be a positive integer k (influence at the end of every k-th "
                "training epoch, and when training ends) or None (only when training ends)."
            )
        if on_results is not None and not callable(on_results):
            raise InfluenceConfigError(
                f"on_results={on_results!r} is not callable; pass a function on_results(trainer, pl_module, results) "
                "or None."
            )
        self.solver: SolverSettings = resolve_solver(solver)
        self.num_queries = num_queries
        self.query_indices = None if args.query_indices is None else list(args.query_indices)
        self.query_dataloader = query_dataloader
        self.damping = damping
        self.params = params
        self.loss_fn = loss_fn
        self.top_k = top_k
        self.self_influence = bool(self_influence)
        self.chunk_size = chunk_size
        self.query_batch_size = query_batch_size
        self.dtype = args.dtype
        self.on_error = on_error
        self.save_results = save_results
        self.report = report
        self.report_path = report_path
        self.render_example = render_example
        self.results: Optional[InfluenceResults] = None
        self.error: Optional[BaseException] = None
        self.results_path: Optional[str] = None
        self.outputs: Dict[str, Any] = {}
        self.every_n_epochs = every_n_epochs
        self.on_results = on_results
        self.history: Dict[int, InfluenceResults] = {}
        self.history_paths: Dict[int, str] = {}
        self.errors: Dict[int, BaseException] = {}
        self._fingerprint: Optional[Dict[str, Any]] = None  # {"epoch", "global_step", "checksum"} of the last run
        self._last_epoch: Optional[int] = None  # the last epoch whose on_train_epoch_end ran
        self._restored = False  # load_state_dict ran for this fit: keep the history
        self._limit_noted = False
        #: whether this fit started a training loop (None before setup): on_train_end runs only then
        self._trained: Optional[bool] = None
        self.output_errors: Dict[str, BaseException] = {}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer)  # a sharded or unknown multi-process strategy is refused before training
        select_params(pl_module, self.params)  # raises if nothing trainable matches
        self._trained = False
        if self.self_influence and self.solver.name in _SOLVED_SELF_INFLUENCE:
            rank_zero_info(
                f"InfluenceCallback: self_influence=True with solver={self.solver.name!r} solves every training "
                "example's gradient as a right-hand side: usually the largest part of the influence computation "
                "(with 'cg' nearly all of it). solver='arnoldi' or 'ekfac' computes self-influence in the scoring "
                "pass at almost no extra cost."
            )
        mine = trainer.callbacks.index(self) if self in trainer.callbacks else -1
        for i, cb in enumerate(trainer.callbacks):
            if i > mine and type(cb).__name__ in _AVERAGING_CALLBACKS:
                rank_zero_warn(
                    f"InfluenceCallback is listed before {type(cb).__name__}, which swaps in the averaged "
                    "weights in its own on_train_end; influence would explain the un-averaged weights. "
                    f"List InfluenceCallback after {type(cb).__name__} in Trainer(callbacks=[...])."
                )

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Checks that need the dataloaders; they run before any training step so that a bad
        # configuration costs nothing.
        self._trained = True
        self._start_history()
        train_loader = self._train_loader(trainer)
        loader = self._query_loader(trainer, required=not self._queries_may_come_later(trainer))
        if loader is not None:
            check_map_dataset(loader.dataset, "query")
            if self.query_indices is not None:
                n = len(loader.dataset)
                bad = [i for i in self.query_indices if i >= n]
                if bad:
                    raise InfluenceConfigError(
                        f"query_indices {bad[:5]} are out of range for a query dataset of {n} examples "
                        f"(valid: 0..{n - 1})."
                    )
        preflight(pl_module, train_loader.dataset, loss_fn=self.loss_fn, params=self.params,
                  collate_fn=train_loader.collate_fn, dtype=self.dtype, solver=self.solver,
                  query_dataset=None if loader is None else loader.dataset,
                  query_collate_fn=None if loader is None else loader.collate_fn,
                  query_indices=self.query_indices, num_queries=self.num_queries)
        self._check_outputs_writable(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning 2.x calls this after the epoch's validation (run inside the epoch loop) and before
        # ModelCheckpoint's own on_train_epoch_end (monitoring callbacks go last): the queries' loader
        # exists, and a checkpoint saved now includes this run in state_dict().
        self._last_epoch = int(trainer.current_epoch)
        if self.every_n_epochs is None or trainer.fast_dev_run or getattr(trainer, "interrupted", False):
            return
        if (self._last_epoch + 1) % self.every_n_epochs != 0:
            return
        if self.query_dataloader is None and trainer.val_dataloaders is None and self._queries_may_come_later(trainer):
            rank_zero_info(f"InfluenceCallback: no influence at the end of epoch {self._last_epoch}: Lightning has "
                           "not loaded the validation data yet (check_val_every_n_epoch > 1); pass "
                           "query_dataloader= to have queries at every epoch.")
            return
        self._run(trainer, pl_module, self._last_epoch, final=False)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if getattr(trainer, "interrupted", False):
            return
        if trainer.fast_dev_run:
            rank_zero_info("InfluenceCallback: skipped under fast_dev_run (its checks ran before training); "
                           "influence is computed at the end of a full fit.")
            return
        epoch = self._last_epoch if self._last_epoch is not None else max(int(trainer.current_epoch) - 1, 0)
        self._run(trainer, pl_module, epoch, final=True)

    def state_dict(self) -> Dict[str, Any]:
        """What a Lightning checkpoint keeps of the callback: ``history`` (each run as
        :meth:`InfluenceResults.to_state`, plain tensors and data), ``history_paths`` and the fingerprint
        of the weights the last run saw; see the class docstring for the size."""
        return {
            "format": _STATE_FORMAT,
            "history": {int(e): r.to_state() for e, r in self.history.items()},
            "history_paths": {int(e): str(p) for e, p in self.history_paths.items()},
            "fingerprint": None if self._fingerprint is None else dict(self._fingerprint),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (on ``trainer.fit(..., ckpt_path=...)``): ``history``,
        ``history_paths`` and, as ``results``, the latest run of the history.

        Raises:
            InfluenceConfigError: the state is not an InfluenceCallback state of this version.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != _STATE_FORMAT:
            got = state_dict.get("format") if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise InfluenceConfigError(
                f"the checkpoint's InfluenceCallback state has format {got!r}; this version reads format "
                f"{_STATE_FORMAT}. Resume without it (remove the callback's entry from the checkpoint's "
                "'callbacks') or recompute."
            )
        self.history = {
            int(e): InfluenceResults.from_state(s, f"the checkpoint's InfluenceCallback history (epoch {e})")
            for e, s in state_dict.get("history", {}).items()
        }
        self.history_paths = {int(e): str(p) for e, p in state_dict.get("history_paths", {}).items()}
        self._fingerprint = state_dict.get("fingerprint")
        self.results = self.history[max(self.history)] if self.history else None
        self._restored = True

    def _start_history(self) -> None:
        """A new fit starts with an empty history, unless a checkpoint just restored one."""
        if not self._restored:
            self.history, self.history_paths, self._fingerprint = {}, {}, None
        self.errors = {}
        self._restored, self._last_epoch, self._limit_noted = False, None, False

    def _weights_fingerprint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> Dict[str, Any]:
        """The epoch, global step and a checksum of the module's state dict (weights and buffers)."""
        return {"epoch": int(epoch), "global_step": int(trainer.global_step),
                "checksum": tensor_checksum(dict(pl_module.state_dict()))}

    def _reusable(self, trainer: "pl.Trainer", fingerprint: Dict[str, Any]) -> bool:
        """Whether the end-of-training run can reuse the last epoch run: same epoch, step and weights.
        Decided on global rank zero and broadcast, so that every rank takes the same path."""
        same = (self._fingerprint == fingerprint and fingerprint["epoch"] in self.history)
        return bool(trainer.strategy.broadcast(same, src=0))

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int, final: bool) -> None:
        """One influence run for the weights after ``epoch``: compute (or, at the end, reuse the last epoch
        run), keep it in ``history``, write its outputs, call ``on_results``; failures follow ``on_error``."""
        self.results, self.error, self.results_path, self.outputs, self.output_errors = None, None, None, {}, {}
        try:
            self._run_guarded(trainer, pl_module, epoch, final)
        finally:
            if self.error is not None:
                self.errors[epoch] = self.error

    def _run_guarded(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int, final: bool) -> None:
        with preserved_rng():
            try:
                with interruptible("the influence computation"):
                    # collectives first, on every rank, before anything that could fail on one rank only
                    out_dir = self._out_dir(trainer)
                    # the fingerprint is a checksum of every weight: taken only where it can be used
                    fingerprint = (self._weights_fingerprint(trainer, pl_module, epoch)
                                   if not final or epoch in self.history else None)
                    reuse = fingerprint is not None and final and self._reusable(trainer, fingerprint)
                    comm = communicator_for(trainer)
                    with comm.agreement():  # a failure on one rank raises on every rank
                        train_loader = self._train_loader(trainer)
                        query_loader = self._query_loader(trainer)
                        assert query_loader is not None
                        if reuse:
                            self.results = self.history[epoch]
                        else:
                            if not self._limit_noted:
                                self._note_limited_batches(trainer, train_loader)
                                self._limit_noted = True
                            self.results = self._compute(trainer, pl_module, train_loader, query_loader, comm)
                            self.results.settings.update(epoch=int(epoch),
                                                         run="end of training" if final else "epoch end")
                            self.history[epoch], self._fingerprint = self.results, fingerprint
                    self._finish(trainer, pl_module, self.results, train_loader, query_loader, out_dir,
                                 epoch=None if final else epoch)
                    if self.on_results is not None and not reuse:
                        with comm.agreement():  # the user's code fails on one rank: every rank stops together
                            self.on_results(trainer, pl_module, self.results)
            except InfluenceInterrupted as err:
                self.error = err
                kept = " The results computed before it are in InfluenceCallback.results." if self.results else ""
                rank_zero_warn(f"InfluenceCallback: {err}{kept} The interrupt is kept in InfluenceCallback.error.")
            except Exception as err:  # noqa: BLE001 - contained on purpose, see on_error
                self.error = err
                if self.on_error == "raise":
                    raise
                where = "when training ended" if final else f"at the end of epoch {epoch}"
                rank_zero_warn(
                    f"InfluenceCallback failed ({type(err).__name__}: {err}) {where}. Training, its weights and "
                    "checkpoints are unaffected; the exception is kept in InfluenceCallback.error. Pass "
                    "on_error='raise' to stop on it instead."
                )

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._trained is not False:
            return
        if trainer.limit_train_batches == 0:
            why = "limit_train_batches=0"
        else:
            limits = f"max_epochs={trainer.max_epochs}" + (f" or max_steps={trainer.max_steps}" if trainer.max_steps != -1 else "")
            start = f"the checkpoint it resumed from ({trainer.ckpt_path})" if trainer.ckpt_path else "the loop state"
            why = f"{start} had already reached {limits} (epoch {trainer.current_epoch}, step {trainer.global_step})"
        rank_zero_warn(
            f"InfluenceCallback computed nothing: trainer.fit ran no training because {why}, and Lightning skips "
            "on_train_end when it does not train. Raise max_epochs to train further, or call "
            "lightning_influence.compute_influence(model, train_dataset, val_dataset) on the trained model."
        )

    # ------------------------------------------------------------------ steps
    def _note_limited_batches(self, trainer: "pl.Trainer", train_loader: DataLoader) -> None:
        """Say so when training saw fewer batches than the loader holds: influence scores them all."""
        used, total = trainer.num_training_batches, len(train_loader)
        if used < total:
            rank_zero_info(
                f"InfluenceCallback: training used {int(used)} of {total} batches per epoch "
                f"(limit_train_batches={trainer.limit_train_batches}); influence scores the whole training "
                f"dataset, all {len(train_loader.dataset)} examples."  # type: ignore[arg-type]
            )

    def _train_loader(self, trainer: "pl.Trainer") -> DataLoader:
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

    def _queries_may_come_later(self, trainer: "pl.Trainer") -> bool:
        """Whether a validation dataloader that is not there at ``on_train_start`` may still be set up
        before training ends (Lightning loads it at the first validation, e.g. with
        ``check_val_every_n_epoch > 1``). ``False`` when validation cannot run at all."""
        if self.query_dataloader is not None or trainer.val_dataloaders is not None:
            return False
        if not trainer.limit_val_batches:
            return False
        from pytorch_lightning.utilities.model_helpers import is_overridden

        if trainer.lightning_module is None or not is_overridden("validation_step", trainer.lightning_module):
            return False
        source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
        is_defined = getattr(source, "is_defined", None)
        return bool(is_defined()) if callable(is_defined) else True

    def _query_loader(self, trainer: "pl.Trainer", required: bool = True) -> Optional[DataLoader]:
        if self.query_dataloader is not None:
            return self.query_dataloader
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            if len(loaders) > 1:
                rank_zero_warn("InfluenceCallback takes queries from the first of several validation dataloaders.")
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

    def _resolve_damping(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> Tuple[Union[float, AutoDamping], str]:
        spec = None if self.damping is None else resolve_damping(self.damping)
        if isinstance(spec, float):
            return spec, "set by the user"
        if isinstance(self.damping, AutoDamping):  # the user's own settings, base included
            return spec, "AutoDamping set by the user: from the Hessian's spectrum"
        chosen = list(select_params(pl_module, self.params).values())
        if spec is None:
            return optimizer_damping(trainer.optimizers, chosen)
        l2, reason = optimizer_l2(trainer.optimizers, chosen)
        return (
            AutoDamping(base=l2 or 0.0),
            f"auto: {reason}, plus what the Hessian's most negative eigenvalue needs (Lanczos estimate)",
        )

    def _compute(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        train_loader: DataLoader,
        query_loader: DataLoader,
        comm: Optional[Communicator] = None,
    ) -> InfluenceResults:
        damping, reason = self._resolve_damping(trainer, pl_module)
        results = compute_influence(
            pl_module,
            train_loader.dataset,
            query_loader.dataset,
            query_indices=self.query_indices,
            num_queries=self.num_queries,
            loss_fn=self.loss_fn,
            params=self.params,
            solver=self.solver,
            damping=damping,
            self_influence=self.self_influence,
            collate_fn=train_loader.collate_fn,
            query_collate_fn=query_loader.collate_fn,
            chunk_size=self.chunk_size,
            query_batch_size=self.query_batch_size,
            dtype=self.dtype,
            progress=self._progress(trainer),
            comm=comm,
        )
        results.settings.update(
            damping_source=reason,
            global_step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
            top_k=self.top_k,
        )
        return results

    def _progress(self, trainer: "pl.Trainer") -> Optional[ProgressFn]:
        from .progress import trainer_progress

        return trainer_progress(trainer)

    def _out_dir(self, trainer: "pl.Trainer") -> Optional[str]:
        """``influence/`` under the trainer's log dir, when a default path needs it. ``trainer.log_dir`` is a
        collective (a broadcast from rank zero): call this on every rank."""
        if not self.save_results and not (self.report and self.report_path is None):
            return None
        from .reporting import influence_dir

        return influence_dir(trainer)

    def _results_file(self, trainer: "pl.Trainer") -> str:
        """The default results path; ``trainer.log_dir`` is a collective: call on every rank."""
        from .reporting import influence_dir

        return os.path.join(influence_dir(trainer), "results.pt")

    def _check_outputs_writable(self, trainer: "pl.Trainer") -> None:
        """Refuse, before training, outputs that cannot be written (a file where a folder must be, no
        write permission). Only global rank zero writes, so only it checks; its verdict is broadcast so
        that every rank raises the same error (a rank alone raising would leave the others waiting in
        training's first collective). The default paths resolve through ``trainer.log_dir``, a collective:
        every rank resolves them."""
        checks = []
        if self.save_results:
            checks.append((self._results_file(trainer), "results file",
                           "Give the Trainer a writable default_root_dir (or logger save_dir), or pass "
                           "save_results=False to InfluenceCallback."))
        if self.report:
            from .reporting import default_report_path

            fix = "Pass report_path= a writable file path, or report=False."
            if self.report_path is not None:
                checks.append((self.report_path, "report_path", fix))
            else:
                checks.append((default_report_path(trainer), "HTML report", fix))
        problem = None
        if trainer.is_global_zero:
            try:
                for path, name, fix in checks:
                    check_writable_file(path, name, fix)
            except InfluenceConfigError as err:
                problem = str(err)
        if trainer.world_size > 1:
            problem = trainer.strategy.broadcast(problem, src=0)
        if problem is not None:
            raise InfluenceConfigError(problem)

    def _finish(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        results: InfluenceResults,
        train_loader: DataLoader,
        query_loader: DataLoader,
        out_dir: Optional[str],
        epoch: Optional[int] = None,
    ) -> None:
        """Write every output on global rank zero (no collectives); each fails on its own (its own warning,
        or one error naming them all for ``on_error="raise"`` once all were tried), and ``results`` stays
        in ``self.results``. ``epoch``: a run inside the loop (``results_epoch{k}.pt``, the loggers'
        scalars and the W&B over-epochs table, :func:`~lightning_influence.reporting.report_epoch`);
        ``None``: the end-of-training outputs."""
        failures: Dict[str, BaseException] = {}
        if self.save_results and out_dir is not None:
            self.results_path = os.path.join(out_dir, "results.pt" if epoch is None else f"results_epoch{epoch}.pt")
            if epoch is not None:
                self.history_paths[epoch] = self.results_path
            if trainer.is_global_zero:
                try:
                    os.makedirs(out_dir, exist_ok=True)
                    results.save(self.results_path)
                except Exception as err:  # noqa: BLE001 - the other outputs still go out
                    failures["results file"], self.results_path = err, None
                    if epoch is not None:
                        self.history_paths.pop(epoch, None)
        if self.report and trainer.is_global_zero and epoch is not None:
            from .reporting import report_epoch

            try:
                self.outputs = report_epoch(trainer, results, epoch=epoch, history=self.history,
                                            train_dataset=train_loader.dataset, top_k=self.top_k,
                                            render_example=self.render_example)
            except Exception as err:  # noqa: BLE001
                failures["report"] = err
            else:
                failures.update(self.outputs.get("errors") or {})
        elif self.report and trainer.is_global_zero:
            from .reporting import report_influence

            report_path = self.report_path if self.report_path is not None else os.path.join(out_dir or ".", "report.html")
            try:
                self.outputs = report_influence(
                    trainer,
                    pl_module,
                    results,
                    train_dataset=train_loader.dataset,
                    query_dataset=query_loader.dataset,
                    results_path=self.results_path,
                    report_path=report_path,
                    render_example=self.render_example,
                    top_k=self.top_k,
                    history=self.history,
                    history_paths=self.history_paths,
                )
            except Exception as err:  # noqa: BLE001
                failures["report"] = err
            else:
                failures.update(self.outputs.get("errors") or {})
        self.output_errors = failures
        if not failures:
            return
        self.error = next(iter(failures.values()))
        if self.on_error == "raise":
            listed = "; ".join(f"{what}: {type(err).__name__}: {err}" for what, err in failures.items())
            raise InfluenceRuntimeError(
                f"InfluenceCallback could not write {len(failures)} output(s) ({listed}). The results are in "
                "InfluenceCallback.results."
            ) from self.error
        for what, err in failures.items():
            rank_zero_warn(
                f"InfluenceCallback could not write the {what} ({type(err).__name__}: {err}). The other outputs "
                "were still written, the results are in InfluenceCallback.results, and the exception is in "
                "InfluenceCallback.output_errors."
            )


class InfluenceCallback(InfluenceCallbackBase, Callback):
    __doc__ = InfluenceCallbackBase.__doc__
