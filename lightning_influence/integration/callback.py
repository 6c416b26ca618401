"""``InfluenceCallback``: influence functions inside a Lightning fit, as a thin schedule over the engine.

The hooks ask a :class:`~.schedule.Schedule` whether to run; a run (:meth:`InfluenceCallbackBase._run`) is
identified by a :class:`~lightning_influence.record.RunKey`, computed by
:func:`~lightning_influence.pipeline.compute_influence`, kept by a :class:`~.store.ResultsStore` (files,
history, reuse, checkpoints) and handed to the reporters. No maths here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..checks import check_positive_int
from ..curvature.damping import AutoDamping, DampingSpec, FixedDamping, optimizer_l2, resolve_damping
from ..distributed import Communicator
from ..errors import InfluenceConfigError, InfluenceInterrupted, InfluenceRuntimeError
from ..guards import Interrupt, interruptible, preserved_rng
from ..objective import LossFn, select_params
from ..pipeline import DEFAULT_DAMPING, ProgressFn, compute_influence, preflight
from ..record import RunKey
from ..reporting.reporters import Reporter, default_reporters, report
from ..results import InfluenceResults
from ..solvers import SolverKind, SolverSettings, resolve_solver
from ..validation import check_flag, check_run_arguments, check_writable_file
from . import loaders
from .outputs import FitOutputs, check_owners, fit_outputs, release_folder
from .reporting import trainer_context
from .schedule import EveryNEpochs, Schedule, from_arguments
from .store import ResultsStore, RunHistory
from .strategy import DEFAULT_COLLECTIVE_TIMEOUT, check_strategy, communicator_for

__all__ = ["InfluenceCallback", "InfluenceCallbackBase", "OnResults", "callback_bases", "optimizer_damping"]

#: ``on_results(trainer, pl_module, results)``, called after each influence computation on every rank
OnResults = Callable[["pl.Trainer", "pl.LightningModule", InfluenceResults], None]
_AVERAGING_CALLBACKS = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")


def optimizer_damping(optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.nn.Parameter]) -> Tuple[float, str]:
    """The fixed damping the callback's ``damping=None`` uses: the optimizer's coupled L2 coefficient on
    ``params`` (:func:`~lightning_influence.curvature.damping.optimizer_l2`), else
    :data:`~lightning_influence.pipeline.DEFAULT_DAMPING`, and why (recorded as the damping's source)."""
    lam, reason = optimizer_l2(optimizers, params)
    return (DEFAULT_DAMPING, f"{reason}; default damping") if lam is None else (lam, reason)


class InfluenceCallbackBase:
    """Scores every training example's influence on chosen validation predictions when training ends (and,
    with a schedule, inside the training loop).

    One class for both Lightning namespaces: :class:`InfluenceCallback` is this class on
    ``pytorch_lightning.Callback`` and, when the ``lightning`` package is installed, on
    ``lightning.pytorch.Callback`` as well, so either ``Trainer`` and either ``LightningCLI`` takes it
    (``class_path: lightning_influence.InfluenceCallback``); ``lightning_influence.lightning.InfluenceCallback``
    is the same class.

    Scores are Koh & Liang's ``I_up,loss(z_train, z_query) = −∇L(z_query)ᵀ (H + λI)⁻¹ ∇L(z_train)``:
    **positive = harmful** (removing the example would lower the query's loss), **negative = helpful**.
    ``H`` is the Hessian of the mean training loss at the trained weights; ``λ`` is the damping. It runs on
    the device Lightning trained on, in ``dtype`` with autocast off, in eval mode; weights, gradients, modes,
    ``requires_grad`` flags, optimizer state and the global random states are unchanged afterwards, so
    training goes on exactly as without the callback. Training examples are indexed by their position in the
    training *dataset*. Misconfiguration is refused before the first training step where the data allow it.

    Args:
        num_queries: how many validation examples to explain; by default those with the highest loss.
        query_indices: explicit positions in the query dataset (overrides ``num_queries``).
        query_dataloader: where queries come from (default: the trainer's validation dataloader).
        solver: ``"auto"`` (default: picked per run from the problem, :mod:`~lightning_influence.solvers.auto`,
            and logged in one line), or a registered solver's name (``"lissa"``, ``"cg"``, ``"exact"``,
            ``"arnoldi"``, ``"ekfac"``, ``"kfac"``: :func:`~lightning_influence.solvers.solver_names`) or a
            settings object.
        damping: ``λ`` in Hessian units. ``"auto"`` (default): the optimizer's coupled L2 ``weight_decay``
            (:meth:`AutoDamping.from_optimizer <lightning_influence.curvature.damping.AutoDamping.from_optimizer>`),
            raised by the solver kind's damping rule where the curvature needs it. A number: exactly that.
            ``None``: exactly the optimizer's coupled L2, else ``DEFAULT_DAMPING``. The choice is
            ``results.record.damping`` (``settings["damping"]``, ``["damping_source"]``).
        params: names, prefixes or globs of the parameters to attribute to (default: all trainable).
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` for ``(inputs, targets)`` batches (default
            per-example cross-entropy); a LightningModule's ``influence_loss(batch)`` overrides it.
        top_k: examples per query in reports.
        self_influence: also compute ``I_up,loss(z, z)`` for every training example; its cost depends on
            the solver's kind (a line at setup says it).
        chunk_size: training examples per chunk (memory vs speed; results unchanged).
        query_batch_size: queries solved together (default: as many as keep the solver state within 1 GiB; results unchanged beyond the solvers' tolerances).
        dtype: ``torch.float32`` (default) or ``torch.float64`` (or their names); half precision is refused.
        on_error: ``"warn"`` (default): a failed run is a warning and ``error``; training and checkpoints
            are unaffected. ``"raise"`` re-raises. Each output fails on its own and ``results`` is kept. A
            first Ctrl+C during a run stops the run only (``error`` is ``InfluenceInterrupted``).
        save_results: write each run's results file (atomically) in ``influence/`` under the log dir.
        report: hand the results to the reporters.
        report_path: path of the HTML report (default ``influence/report.html`` under the log dir).
        render_example: ``render_example(example) -> value`` for report previews.
        every_n_epochs: also run at the end of every ``k``-th epoch (after its validation, before
            ``ModelCheckpoint`` saves); files ``results_epoch{e}.pt``.
        every_n_steps: also run after every ``k``-th optimizer step; files ``results_step{s}.pt``.
        schedule: a :class:`~.schedule.Schedule` object instead of the two above.
        reporters: the outputs (default :func:`~lightning_influence.reporting.default_reporters`: logger
            scalars, the HTML report, W&B when the Trainer has a ``WandbLogger``); each gets every run
            (``report_run``) and the end of training (``report_fit``).
        on_results: ``on_results(trainer, pl_module, results)`` after each computation, on every rank.
        collective_timeout: with several processes (DDP), seconds a rank waits in one influence collective
            for the others (default 600): a rank that stopped (SIGSTOP), hangs or died ends the run with an
            error on every rank within it, instead of Lightning's process-group timeout (30 minutes). The
            influence phase has a process group of its own, and after SIGTERM every rank stops it together.
            Raise it if the ranks legitimately drift apart longer (rank zero writes the outputs while the
            others wait).

    The end-of-training run reuses the last in-loop run when the weights are bit-identical to those it saw.
    ``state_dict`` keeps the history (about ``(4·(Q+1) + 8)·N`` bytes per run in float32), so a fit resumed
    with ``ckpt_path=`` gets it back.

    Example:
        >>> cb = InfluenceCallback(num_queries=8, solver="ekfac", every_n_steps=500, self_influence=True)
        >>> cb.schedule.describe()
        'every 500 optimizer steps, and when training ends'
        >>> cb.state_key
        "InfluenceCallback{'solver': 'ekfac', 'num_queries': 8, 'schedule': 'EveryNSteps(n=500)', 'params': None}"

    Attributes:
        results: the latest run's :class:`InfluenceResults` (``None`` before or on failure).
        history: every run of the fit, a :class:`~.store.RunHistory` keyed by
            :class:`~lightning_influence.record.RunKey` (``history[e]``: the latest run of epoch ``e``).
        history_paths: the in-loop runs' results files, keyed the same way.
        error / errors: the latest run's exception / every failed run's, keyed by run.
        output_errors: ``{output: exception}`` for the latest run's outputs that failed.
        results_path: where global rank zero saved the latest results. outputs: what the reporters wrote.
    """

    def __init__(
        self,
        num_queries: int = 16,
        *,
        query_indices: Optional[Sequence[int]] = None,
        query_dataloader: Optional[DataLoader] = None,
        solver: Union[str, SolverSettings] = "auto",
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
        every_n_steps: Optional[int] = None,
        schedule: Optional[Schedule] = None,
        reporters: Optional[Sequence[Reporter]] = None,
        on_results: Optional[OnResults] = None,
        collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
    ) -> None:
        args = check_run_arguments(num_queries=num_queries, query_indices=query_indices, params=params,
                                   chunk_size=chunk_size, query_batch_size=query_batch_size, dtype=dtype,
                                   self_influence=self_influence, damping=damping)
        _check_arguments(query_dataloader=query_dataloader, on_error=on_error, damping=damping, loss_fn=loss_fn,
                         render_example=render_example, on_results=on_results, top_k=top_k, reporters=reporters,
                         save_results=save_results, report=report, report_path=report_path)
        self.solver: SolverSettings = resolve_solver(solver)
        self.schedule = from_arguments(schedule, every_n_epochs, every_n_steps)
        self.num_queries, self.query_dataloader, self.damping = num_queries, query_dataloader, damping
        self.query_indices = None if args.query_indices is None else list(args.query_indices)
        self.params, self.loss_fn, self.top_k, self.self_influence = params, loss_fn, top_k, bool(self_influence)
        self.chunk_size, self.query_batch_size, self.dtype = chunk_size, query_batch_size, args.dtype
        self.on_error, self.report, self.report_path, self.render_example = on_error, report, report_path, render_example
        self.reporters = None if reporters is None else list(reporters)
        self.on_results = on_results
        self.collective_timeout = _check_timeout(collective_timeout)
        self.store = ResultsStore(save=save_results)
        self.results: Optional[InfluenceResults] = None
        self.error: Optional[BaseException] = None
        self.errors: RunHistory[BaseException] = RunHistory()
        self.results_path: Optional[str] = None
        self.outputs: Dict[str, Any] = {}
        self.output_errors: Dict[str, BaseException] = {}
        self._last_epoch: Optional[int] = None  # the last epoch whose on_train_epoch_end ran
        self._last_step_run = -1  # the global step of the last step-triggered run
        self._limit_noted = False
        self._trained: Optional[bool] = None  # whether this fit started a training loop (None before setup)
        self._outputs: Optional[FitOutputs] = None  # this fit's folder and report path (on_train_start)
        self._train_indices: Optional[List[int]] = None  # the examples the training sampler draws from, when known
        self._interrupt: Optional[Interrupt] = None  # the current run's Ctrl+C guard

    # ------------------------------------------------------------------ public state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(solver=self.solver.name, num_queries=self.num_queries,  # type: ignore[attr-defined]
                                        schedule=repr(self.schedule), params=self.params)

    @property
    def save_results(self) -> bool:
        return self.store.save_files

    @property
    def history(self) -> RunHistory[InfluenceResults]:
        return self.store.history

    @history.setter
    def history(self, value: Mapping[Any, InfluenceResults]) -> None:
        self.store.history = value if isinstance(value, RunHistory) else RunHistory(value)

    @property
    def history_paths(self) -> RunHistory[str]:
        return self.store.paths

    @property
    def every_n_epochs(self) -> Optional[int]:
        return self.schedule.n if isinstance(self.schedule, EveryNEpochs) else None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer)  # a sharded or unknown multi-process strategy is refused before training
        select_params(pl_module, self.params)  # raises if nothing trainable matches
        self._trained = False
        if self.self_influence and self.solver.kind is SolverKind.ITERATIVE:
            rank_zero_info(f"InfluenceCallback: {self.solver.kind.self_influence_cost(self.solver.name)}")
        mine = trainer.callbacks.index(self) if self in trainer.callbacks else -1
        for i, cb in enumerate(trainer.callbacks):
            if i > mine and type(cb).__name__ in _AVERAGING_CALLBACKS:
                rank_zero_warn(
                    f"InfluenceCallback is listed before {type(cb).__name__}, which swaps in the averaged "
                    "weights in its own on_train_end; influence would explain the un-averaged weights. "
                    f"List InfluenceCallback after {type(cb).__name__} in Trainer(callbacks=[...])."
                )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # checks that need the dataloaders, before any training step: a bad configuration costs nothing
        self._trained = True
        self.store.start_fit()
        self.errors, self._last_epoch, self._last_step_run, self._limit_noted = RunHistory(), None, -1, False
        # the collectives first, on every rank, before any check can fail on one rank only
        self._outputs = fit_outputs(trainer, save_results=self.save_results, report=self.report,
                                    report_path=self.report_path)
        comm = communicator_for(trainer, self.collective_timeout)
        try:
            failure: Optional[Exception] = None
            try:
                self._check_before_training(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - raised below on every rank
                failure = err
            comm.raise_together(failure)  # a check that fails on one rank raises its message on every rank
        finally:
            comm.close()

    def _check_before_training(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Every check that needs the dataloaders, on this rank alone (no collectives)."""
        train = loaders.train_loader(trainer)
        self._train_indices = self._sampled_examples(train)
        later = loaders.queries_may_come_later(trainer, self.query_dataloader)
        query = loaders.query_loader(trainer, self.query_dataloader, required=not later, warn=rank_zero_warn)
        if query is not None:
            loaders.check_query_range(self.query_indices, query)
        preflight(pl_module, train.dataset, loss_fn=self.loss_fn, params=self.params, collate_fn=train.collate_fn,
                  dtype=self.dtype, solver=self.solver, query_dataset=None if query is None else query.dataset,
                  query_collate_fn=None if query is None else query.collate_fn, query_indices=self.query_indices,
                  num_queries=self.num_queries, train_indices=self._train_indices)
        self._check_outputs_writable(trainer)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        if step == self._last_step_run or not self.schedule.after_step(step, epoch):
            return
        self._last_step_run = step
        key = RunKey("step", epoch, step)
        if self._may_run_in_loop(trainer, key):
            self._run(trainer, pl_module, key)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning 2.x calls this after the epoch's validation and before ModelCheckpoint's own
        # on_train_epoch_end: the queries' loader exists, and a checkpoint saved now includes this run
        self._last_epoch = epoch = int(trainer.current_epoch)
        key = RunKey("epoch", epoch, int(trainer.global_step))
        if self.schedule.after_epoch(epoch, key.global_step) and self._may_run_in_loop(trainer, key):
            self._run(trainer, pl_module, key)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if getattr(trainer, "interrupted", False):
            return
        if trainer.fast_dev_run:
            rank_zero_info("InfluenceCallback: skipped under fast_dev_run (its checks ran before training); "
                           "influence is computed at the end of a full fit.")
            return
        epoch = self._last_epoch if self._last_epoch is not None else max(int(trainer.current_epoch) - 1, 0)
        self._run(trainer, pl_module, RunKey("final", epoch, int(trainer.global_step)))

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero and self._outputs is not None:
            release_folder(self._outputs.folder)  # removed when this fit wrote nothing there
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

    @override
    def state_dict(self) -> Dict[str, Any]:
        """Every run of the fit (plain tensors and data), the results files and the fingerprint of the
        weights the last run saw (:meth:`~.store.ResultsStore.state_dict`)."""
        return self.store.state_dict()

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on ``trainer.fit(..., ckpt_path=...)``; ``results`` is the latest run."""
        self.store.load_state_dict(state_dict)
        self.results = self.history.latest()

    # ------------------------------------------------------------------ one run
    def _may_run_in_loop(self, trainer: "pl.Trainer", key: RunKey) -> bool:
        if trainer.fast_dev_run or getattr(trainer, "interrupted", False):
            return False
        if loaders.queries_may_come_later(trainer, self.query_dataloader):
            why = "check_val_every_n_epoch > 1" if key.trigger == "epoch" else "no validation has run yet"
            rank_zero_info(f"InfluenceCallback: no influence {key.where}: Lightning has not loaded the validation "
                           f"data yet ({why}); pass query_dataloader= to have queries at every "
                           f"{'epoch' if key.trigger == 'epoch' else 'run'}.")
            return False
        return True

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", key: RunKey) -> None:
        """One influence run for the weights at ``key``: compute (or, at the end, reuse an in-loop run), keep
        it, write its outputs, call ``on_results``; failures follow ``on_error``."""
        self.results, self.error, self.results_path, self.outputs, self.output_errors = None, None, None, {}, {}
        final = key.trigger == "final"
        try:
            with preserved_rng(), interruptible("the influence computation") as self._interrupt, \
                    self._communicator(trainer) as comm:
                # collectives first, on every rank, before anything that could fail on one rank only
                out_dir = self._out_dir(trainer)
                fingerprint = (ResultsStore.weights_fingerprint(pl_module, trainer.global_step)
                               if not final or len(self.history) else None)  # a checksum only where it can be used
                reused = self.store.reusable(fingerprint) if final and fingerprint is not None else None
                with comm.agreement():  # a failure on one rank raises on every rank
                    # reused only where every rank still holds the same run (the same decision on every rank)
                    reuse = comm.all_true(reused is not None) if final and fingerprint else False
                    train = loaders.train_loader(trainer)
                    query = loaders.query_loader(trainer, self.query_dataloader, warn=rank_zero_warn)
                    if reuse:
                        self.results = self.history[reused]  # type: ignore[index]
                    else:
                        if not self._limit_noted:
                            note = loaders.limited_batches_note(
                                trainer, train, None if self._train_indices is None else len(self._train_indices))
                            if note:
                                rank_zero_info(note)
                            self._limit_noted = True
                        results = self._compute(trainer, pl_module, train, query, comm)
                        results.record = results.record.with_key(key)
                        if "auto_reason" in results.settings:
                            rank_zero_info(f"InfluenceCallback: solver='auto' chose {results.settings['auto_reason']}.")
                        self.store.keep(key, results, fingerprint)
                        self.results = results
                    self._finish(trainer, self.results, train, query, out_dir, key)
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
            rank_zero_warn(
                f"InfluenceCallback failed ({type(err).__name__}: {err}) {key.where}. Training, its weights and "
                "checkpoints are unaffected; the exception is kept in InfluenceCallback.error. Pass "
                "on_error='raise' to stop on it instead."
            )
        finally:
            if self.error is not None:
                self.errors[key] = self.error

    @contextlib.contextmanager
    def _communicator(self, trainer: "pl.Trainer") -> Iterator[Communicator]:
        """This run's communicator (its own process group under DDP: a collective), closed afterwards."""
        comm = communicator_for(trainer, self.collective_timeout)
        try:
            yield comm
        finally:
            comm.close()

    def _damping(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> DampingSpec:
        """The damping argument for this run: what the user set, or what the optimizer implies."""
        if self.damping is not None and not (isinstance(self.damping, str) and self.damping == "auto"):
            spec = resolve_damping(self.damping)
            return AutoDamping(**{**vars(spec), "source": spec.source or "AutoDamping set by the user: from the "
                                  "curvature"}) if isinstance(spec, AutoDamping) else spec
        chosen = list(select_params(pl_module, self.params).values())
        if self.damping is None:
            return FixedDamping(*optimizer_damping(trainer.optimizers, chosen))
        auto = AutoDamping.from_optimizer(trainer.optimizers, chosen)
        return AutoDamping(base=auto.base, source=f"auto: {auto.source}, plus what the curvature needs (the "
                           f"{self.solver.name} solver's damping rule)")

    def _compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", train: DataLoader, query: DataLoader,
                 comm: Optional[Communicator] = None) -> InfluenceResults:
        return compute_influence(
            pl_module, train.dataset, query.dataset, query_indices=self.query_indices, num_queries=self.num_queries,
            loss_fn=self.loss_fn, params=self.params, solver=self.solver, damping=self._damping(trainer, pl_module),
            self_influence=self.self_influence, collate_fn=train.collate_fn, query_collate_fn=query.collate_fn,
            chunk_size=self.chunk_size, query_batch_size=self.query_batch_size, dtype=self.dtype,
            progress=self._checked_progress(trainer), comm=comm, train_indices=self._train_indices)

    @staticmethod
    def _sampled_examples(train: DataLoader) -> Optional[List[int]]:
        """The examples the training sampler draws from when it leaves some out and says which (one line
        saying so), else ``None`` (a warning when it may leave some out unseen): :func:`.loaders.sampled_examples`."""
        drawn, note = loaders.sampled_examples(train)
        if note is not None:
            (rank_zero_info if drawn is not None else rank_zero_warn)(note)
        return drawn

    def _progress(self, trainer: "pl.Trainer") -> Optional[ProgressFn]:
        from .progress import trainer_progress

        return trainer_progress(trainer)

    def _checked_progress(self, trainer: "pl.Trainer") -> ProgressFn:
        """:meth:`_progress`, first stopping the run if a Ctrl+C arrived that an op swallowed, or (one process)
        once Lightning received SIGTERM."""
        inner, interrupt = self._progress(trainer), getattr(self, "_interrupt", None)

        def progress(phase: str, done: int, total: int) -> None:
            if interrupt is not None:
                interrupt.check()
            if trainer.world_size <= 1 and getattr(trainer, "received_sigterm", False):  # several: the communicator
                raise InfluenceInterrupted("SIGTERM stopped the influence computation; training, its weights and "
                                           "checkpoints are kept.")
            if inner is not None:
                inner(phase, done, total)

        return progress

    # ------------------------------------------------------------------ outputs
    def _fit_outputs(self, trainer: "pl.Trainer") -> FitOutputs:
        """This fit's folder and report path, claimed at ``on_train_start`` (:mod:`.outputs`)."""
        if self._outputs is None:  # a run without on_train_start (only when driven by hand): claim now
            self._outputs = fit_outputs(trainer, save_results=self.save_results, report=self.report,
                                        report_path=self.report_path)
        return self._outputs

    def _out_dir(self, trainer: "pl.Trainer") -> Optional[str]:
        """This fit's own folder (``influence/``, ``influence_v1/``, … under the run's folder) when the results
        or the default report need one."""
        return self._fit_outputs(trainer).folder

    def _other_outputs(self, trainer: "pl.Trainer") -> List[Tuple[str, FitOutputs]]:
        """The outputs of the fit's other InfluenceCallbacks that have claimed theirs."""
        return [(f"InfluenceCallback #{i}'s", cb._outputs) for i, cb in enumerate(trainer.callbacks)
                if cb is not self and isinstance(cb, InfluenceCallbackBase) and cb._outputs is not None]

    def _check_outputs_writable(self, trainer: "pl.Trainer") -> None:
        """Refuse, before training, outputs that cannot be written or that would write onto another output's
        path (:func:`~.outputs.check_owners`). Only global rank zero writes, so only it checks; its verdict is
        shared through :meth:`on_train_start`'s agreement, so that every rank raises the same error."""
        outputs = self._fit_outputs(trainer)
        checks = []
        if self.save_results and outputs.folder is not None:
            checks.append((ResultsStore.path_for(outputs.folder, RunKey("final")), "results file",
                           "Give the Trainer a writable default_root_dir (or logger save_dir), or pass "
                           "save_results=False to InfluenceCallback."))
        if outputs.report is not None:
            checks.append((outputs.report, "report_path" if outputs.explicit_report else "HTML report",
                           "Pass report_path= a writable file path, or report=False."))
        if trainer.is_global_zero:  # rank zero's failure reaches the others through on_train_start's agreement
            for path, name, fix in checks:
                check_writable_file(path, name, fix)
            check_owners(outputs, trainer, self._other_outputs(trainer))

    def _finish(self, trainer: "pl.Trainer", results: InfluenceResults, train: DataLoader, query: DataLoader,
                out_dir: Optional[str], key: RunKey) -> None:
        """Write every output on global rank zero (no collectives); each fails on its own (its own warning,
        or one error naming them all for ``on_error="raise"`` once all were tried)."""
        failures: Dict[str, BaseException] = {}
        if self.save_results and out_dir is not None:
            try:
                self.results_path = self.store.write(results, out_dir, key, trainer.is_global_zero)
            except Exception as err:  # noqa: BLE001 - the other outputs still go out
                failures["results file"], self.results_path = err, None
                self.store.paths.pop(key, None)
        if self.report and trainer.is_global_zero:
            path = self._fit_outputs(trainer).report
            context = trainer_context(
                trainer, train_dataset=train.dataset, query_dataset=query.dataset, report_path=path, key=key,
                render_example=self.render_example, top_k=self.top_k, results_path=self.results_path,
                history=self.history, history_paths=self.history_paths)
            out = report(results, self.reporters if self.reporters is not None else default_reporters(), context)
            failures.update(out.pop("errors"))
            self.outputs = out
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


def _check_timeout(value: Any) -> float:
    """``collective_timeout`` as seconds: a finite number > 0 (or a ``datetime.timedelta``)."""
    import datetime
    import math

    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (0 < seconds < math.inf):
        raise InfluenceConfigError(f"collective_timeout={value!r} must be a number of seconds > 0 (or a "
                                   "datetime.timedelta), e.g. collective_timeout=600.")
    return float(seconds)


def _check_arguments(**kw: Any) -> None:
    """The callback's own arguments (the shared ones are :func:`~lightning_influence.validation.check_run_arguments`')."""
    check_positive_int("top_k", kw["top_k"])
    for flag in ("save_results", "report"):
        check_flag(flag, kw[flag])
    path = kw["report_path"]
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InfluenceConfigError(f"report_path={path!r} must be a file path (str or os.PathLike) or None for "
                                   "influence/report.html beside the results.")
    if kw["query_dataloader"] is not None and not isinstance(kw["query_dataloader"], DataLoader):
        raise InfluenceConfigError(f"query_dataloader must be a torch DataLoader, got {type(kw['query_dataloader']).__name__}.")
    if kw["on_error"] not in ("warn", "raise"):
        raise InfluenceConfigError(f"on_error={kw['on_error']!r} must be 'warn' or 'raise'.")
    if kw["damping"] is not None:
        resolve_damping(kw["damping"])
    for name, signature in (("loss_fn", "loss_fn(outputs, targets) -> Tensor[B]"),
                            ("render_example", "render_example(example) -> value"),
                            ("on_results", "on_results(trainer, pl_module, results)")):
        if kw[name] is not None and not callable(kw[name]):
            raise InfluenceConfigError(f"{name}={kw[name]!r} is not callable; pass a function {signature} or None.")
    reporters = kw["reporters"]
    if reporters is not None:
        bad = [r for r in (reporters if isinstance(reporters, (list, tuple)) else [reporters]) if not callable(r)]
        if bad or not isinstance(reporters, (list, tuple)):
            raise InfluenceConfigError(f"reporters={reporters!r} must be a list of reporters (Scalars(), Html(), "
                                       "Wandb(), or subclasses of lightning_influence.reporting.Reporter).")


def callback_bases() -> Tuple[type, ...]:
    """``pytorch_lightning.Callback``, and ``lightning.pytorch.Callback`` too when the ``lightning`` package is
    installed: the bases of :class:`InfluenceCallback`, so that both Trainers and both ``LightningCLI``\\ s
    (which accept only subclasses of their own namespace's ``Callback``) take the one class."""
    bases: List[type] = [Callback]
    if importlib.util.find_spec("lightning") is not None:
        try:
            from lightning.pytorch.callbacks import Callback as LightningCallback
        except ImportError:  # pragma: no cover - a broken lightning install: pytorch_lightning only
            LightningCallback = Callback
        if LightningCallback is not Callback:
            bases.append(LightningCallback)
    return tuple(bases)


class InfluenceCallback(InfluenceCallbackBase, *callback_bases()):  # type: ignore[misc]
    __doc__ = InfluenceCallbackBase.__doc__
