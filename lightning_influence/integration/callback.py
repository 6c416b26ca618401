"""``InfluenceCallback``: influence functions inside a Lightning fit, as a thin schedule over the engine.

The hooks ask a :class:`~.schedule.Schedule` whether to run; a run (:meth:`InfluenceCallbackBase._run`) is
identified by a :class:`~lightning_influence.record.RunKey`, computed by
:func:`~lightning_influence.pipeline.compute_influence`, kept by a :class:`~.store.ResultsStore` (files,
history, reuse, checkpoints) and handed to the reporters. No maths here.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..curvature.damping import AutoDamping, DampingSpec, damping_for_optimizers, optimizer_damping
from ..distributed import Communicator
from ..errors import InfluenceConfigError, InfluenceInterrupted
from ..guards import Interrupt, interruptible, preserved_rng
from ..index import DEFAULT_PROJECTION_DIM, InfluenceIndex
from ..objective import LossFn, select_params
from ..pipeline import ProgressFn, compute_influence, preflight
from ..record import RunKey
from ..reporting.reporters import Reporter
from ..results import InfluenceResults
from ..solvers import SolverKind, SolverSettings, resolve_solver
from ..validation import check_run_arguments
from . import loaders
from .budget import TimeBudget, budgeted_solver, check_time_budget
from .checks import (averaging_order_note, check_build_index, check_callback_arguments, check_timeout,
                     nothing_trained_note)
from .outputs import FitOutputs, fit_outputs, release_folder
from .progress import checked_progress
from .schedule import EveryNEpochs, Schedule, from_arguments
from .store import ResultsStore, RunHistory
from .strategy import DEFAULT_COLLECTIVE_TIMEOUT, check_strategy, opened_communicator
from .writer import build_run_index, check_outputs_writable, settle_failures, write_outputs

__all__ = ["InfluenceCallback", "InfluenceCallbackBase", "OnResults", "callback_bases", "optimizer_damping"]

#: ``on_results(trainer, pl_module, results)``, called after each influence computation on every rank
OnResults = Callable[["pl.Trainer", "pl.LightningModule", InfluenceResults], None]


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
        decode: ``decode(token_ids: list[int]) -> str`` (a tokenizer's ``decode``): token ids (inputs, sequence
            labels, what ``render_example`` returns, the tokens of the per-token heat map) are shown as this
            text in every report; ``render_example`` picks what is shown, ``decode`` turns ids into text. A
            ``decode`` that fails on an example shows its ids (one warning); one that is not callable is refused
            here.
        per_token: also score each target token of every query (a language model's queries, loss summed over
            tokens): ``results.token_scores`` (see :func:`~lightning_influence.pipeline.compute_influence`), in
            the same solve and training pass; the HTML report shows a heat map per query and W&B a table
            ``influence/token_influence``. Refused before training when the loss cannot be split into tokens.
        every_n_epochs: also run at the end of every ``k``-th epoch (after its validation, before
            ``ModelCheckpoint`` saves); files ``results_epoch{e}.pt``.
        every_n_steps: also run after every ``k``-th optimizer step; files ``results_step{s}.pt``.
        schedule: a :class:`~.schedule.Schedule` object instead of the two above.
        reporters: the outputs (default :func:`~lightning_influence.reporting.default_reporters`: logger
            scalars, the HTML report, W&B when the Trainer has a ``WandbLogger``); each gets every run
            (``report_run``) and the end of training (``report_fit``).
        on_results: ``on_results(trainer, pl_module, results)`` after each computation, on every rank.
        build_index: ``True`` (or ``"exact"``, ``"compressed"``): when training ends, also build an
            :class:`~lightning_influence.index.InfluenceIndex` of the training set under the same solver and
            damping as the run (``influence/index/`` in the fit's folder; ``cb.index``), so that
            :meth:`explain` answers new queries without a pass over the training set. ``"compressed"``
            stores ``index_projection_dim`` numbers per example instead of ``P`` (with EK-FAC/K-FAC a whitened
            CountSketch, :mod:`lightning_influence.index.sketch`; else a Gaussian projection). A failed build is an
            output failure (``output_errors["influence index"]``), never a lost run.
        index_projection_dim: the compressed index's projection size ``k``.
        time_budget: with ``solver="auto"``, how long its Hessian solvers may be estimated to take before
            it picks EK-FAC instead (:mod:`~lightning_influence.solvers.auto`, rule 5; the choice and the
            estimate are logged). ``"training"`` (default): as long as the training run so far, at least
            60 s. A number: seconds. ``None``: no limit (exact or CG scores whatever they cost). Other
            solvers ignore it.
        collective_timeout: with several processes (DDP), seconds a rank waits in one influence collective
            for the others (default 600): a rank that stopped (SIGSTOP), hangs or died ends the run with an
            error on every rank within it, instead of Lightning's process-group timeout (30 minutes). The
            influence phase has a process group of its own, and after SIGTERM every rank stops it together.
            Raise it if the ranks legitimately drift apart longer (rank zero writes the outputs while the
            others wait).

    The end-of-training run reuses the last in-loop run when the weights are bit-identical to those it saw.
    ``state_dict`` keeps the history (about ``(4·(Q+1) + 8)·N`` bytes per run in float32, ``4·R·N`` more with
    ``per_token`` for ``R`` query tokens), so a fit resumed
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
        index: the :class:`~lightning_influence.index.InfluenceIndex` built when training ended
            (``build_index=True``; ``None`` otherwise or on failure).
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
        decode: Optional[Callable[[List[int]], str]] = None,
        per_token: bool = False,
        every_n_epochs: Optional[int] = None,
        every_n_steps: Optional[int] = None,
        schedule: Optional[Schedule] = None,
        reporters: Optional[Sequence[Reporter]] = None,
        on_results: Optional[OnResults] = None,
        build_index: Union[bool, Literal["exact", "compressed"]] = False,
        index_projection_dim: int = DEFAULT_PROJECTION_DIM,
        collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
        time_budget: TimeBudget = "training",
    ) -> None:
        args = check_run_arguments(num_queries=num_queries, query_indices=query_indices, params=params,
                                   chunk_size=chunk_size, query_batch_size=query_batch_size, dtype=dtype,
                                   self_influence=self_influence, damping=damping)
        check_callback_arguments(query_dataloader=query_dataloader, on_error=on_error, damping=damping, loss_fn=loss_fn,
                                 render_example=render_example, decode=decode, per_token=per_token,
                                 on_results=on_results, top_k=top_k,
                                 reporters=reporters, save_results=save_results, report=report, report_path=report_path)
        check_time_budget(time_budget)
        self.solver: SolverSettings = resolve_solver(solver)
        self.time_budget: TimeBudget = time_budget
        self._train_started: Optional[float] = None
        self._influence_seconds = 0.0
        self.schedule = from_arguments(schedule, every_n_epochs, every_n_steps)
        self.num_queries, self.query_dataloader, self.damping = num_queries, query_dataloader, damping
        self.query_indices = None if args.query_indices is None else list(args.query_indices)
        self.params, self.loss_fn, self.top_k, self.self_influence = params, loss_fn, top_k, bool(self_influence)
        self.chunk_size, self.query_batch_size, self.dtype = chunk_size, query_batch_size, args.dtype
        self.on_error, self.report, self.report_path, self.render_example = on_error, report, report_path, render_example
        self.decode, self.per_token = decode, bool(per_token)
        self.reporters = None if reporters is None else list(reporters)
        self.on_results = on_results
        self.collective_timeout = check_timeout(collective_timeout)
        self.build_index = check_build_index(build_index, index_projection_dim)
        self.index_projection_dim = index_projection_dim
        self.index: Optional[InfluenceIndex] = None
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
        self._module: Any = None  # the module the index was built for (explain)

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
        note = averaging_order_note(trainer.callbacks, self)
        if note:
            rank_zero_warn(note)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # checks that need the dataloaders, before any training step: a bad configuration costs nothing
        self._trained = True
        # the length of training so far, for time_budget="training": the fit's time less its influence runs'
        self._train_started, self._influence_seconds = time.perf_counter(), 0.0
        self.store.start_fit()
        self.errors, self._last_epoch, self._last_step_run, self._limit_noted = RunHistory(), None, -1, False
        # the collectives first, on every rank, before any check can fail on one rank only
        self._outputs = fit_outputs(trainer, save_results=self.save_results, report=self.report,
                                    report_path=self.report_path)
        with opened_communicator(trainer, self.collective_timeout) as comm:
            failure: Optional[Exception] = None
            try:
                self._check_before_training(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - raised below on every rank
                failure = err
            comm.raise_together(failure)  # a check that fails on one rank raises its message on every rank

    def _check_before_training(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Every check that needs the dataloaders, on this rank alone (no collectives)."""
        train = loaders.train_loader(trainer)
        self._train_indices, note = loaders.sampled_examples(train)  # the examples the sampler draws from
        if note is not None:
            (rank_zero_info if self._train_indices is not None else rank_zero_warn)(note)
        later = loaders.queries_may_come_later(trainer, self.query_dataloader)
        query = loaders.query_loader(trainer, self.query_dataloader, required=not later, warn=rank_zero_warn)
        if query is not None:
            loaders.check_query_range(self.query_indices, query)
        preflight(pl_module, train.dataset, loss_fn=self.loss_fn, params=self.params, collate_fn=train.collate_fn,
                  dtype=self.dtype, solver=self.solver, query_dataset=None if query is None else query.dataset,
                  query_collate_fn=None if query is None else query.collate_fn, query_indices=self.query_indices,
                  num_queries=self.num_queries, train_indices=self._train_indices, per_token=self.per_token)
        check_outputs_writable(trainer, self._fit_outputs(trainer), save_results=self.save_results,
                               others=self._other_outputs(trainer))

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
        if self._trained is False:
            rank_zero_warn(nothing_trained_note(trainer))

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
        note = loaders.no_queries_yet_note(trainer, self.query_dataloader, key.trigger, key.where)
        if note:
            rank_zero_info(note)
        return note is None

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", key: RunKey) -> None:
        """One influence run for the weights at ``key`` (:meth:`_attempt`); failures follow ``on_error``."""
        self.results, self.error, self.results_path, self.outputs, self.output_errors = None, None, None, {}, {}
        started = time.perf_counter()
        try:
            with preserved_rng(), interruptible("the influence computation") as self._interrupt, \
                    opened_communicator(trainer, self.collective_timeout) as comm:
                self._attempt(trainer, pl_module, key, comm)
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
            self._influence_seconds += time.perf_counter() - started
            if self.error is not None:
                self.errors[key] = self.error

    def _attempt(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", key: RunKey, comm: Communicator) -> None:
        """Compute run ``key`` (or, at the end, reuse an in-loop run of the same weights), keep it, write its
        outputs, call ``on_results``. A failure on one rank raises on every rank."""
        final = key.trigger == "final"
        # collectives first, on every rank, before anything that could fail on one rank only
        self._fit_outputs(trainer)
        fingerprint = (ResultsStore.weights_fingerprint(pl_module, trainer.global_step)
                       if not final or len(self.history) else None)  # a checksum only where it can be used
        reused = self.store.reusable(fingerprint) if final and fingerprint is not None else None
        with comm.agreement():
            # reused only where every rank still holds the same run (the same decision on every rank)
            reuse = comm.all_true(reused is not None) if final and fingerprint else False
            train = loaders.train_loader(trainer)
            query = loaders.query_loader(trainer, self.query_dataloader, warn=rank_zero_warn)
            if reuse:
                self.results = self.history[reused]  # type: ignore[index]
            else:
                if not self._limit_noted:
                    scored = None if self._train_indices is None else len(self._train_indices)
                    note, self._limit_noted = loaders.limited_batches_note(trainer, train, scored), True
                    if note:
                        rank_zero_info(note)
                self.results = self._compute(trainer, pl_module, train, query, comm)
                self.results.record = self.results.record.with_key(key)
                if "auto_reason" in self.results.settings:
                    rank_zero_info(f"InfluenceCallback: solver='auto' chose {self.results.settings['auto_reason']}.")
                self.store.keep(key, self.results, fingerprint)
            self._finish(trainer, self.results, train, query, key)
        if self.build_index and final:
            self._index(trainer, pl_module, train, comm)
        if self.on_results is not None and not reuse:
            with comm.agreement():  # the user's code fails on one rank: every rank stops together
                self.on_results(trainer, pl_module, self.results)

    def _index(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", train: DataLoader,
               comm: Communicator) -> None:
        """Build :attr:`index` for the run's weights (:func:`~.writer.build_run_index`, every rank together); a
        failure is an output failure."""
        try:
            self.index = build_run_index(pl_module, train, self.results, self._fit_outputs(trainer).folder, comm,
                                         representation=self.build_index, projection_dim=self.index_projection_dim,
                                         solver=self.solver, loss_fn=self.loss_fn, params=self.params,
                                         chunk_size=self.chunk_size, dtype=self.dtype, train_indices=self._train_indices)
            self._module = pl_module
        except Exception as err:  # noqa: BLE001 - the run's results and outputs are kept
            self.index, self.output_errors = None, {**self.output_errors, "influence index": err}
            self.error = settle_failures({"influence index": err}, self.on_error, rank_zero_warn)

    def explain(self, dataset: Any, indices: Optional[Sequence[int]] = None, *, num_queries: int = 16,
                collate_fn: Optional[Callable[..., Any]] = None) -> InfluenceResults:
        """The influence of every training example on the examples ``indices`` of ``dataset`` (default: its
        ``num_queries`` highest-loss ones), answered from :attr:`index` (``build_index=True``) with one
        product per query, no pass over the training set: :class:`InfluenceResults` as ``results`` (positive =
        harmful), for the weights training ended with. Raises
        :class:`~lightning_influence.index.IndexMismatchError` if the model's weights have changed since."""
        if self.index is None:
            raise InfluenceConfigError("InfluenceCallback.explain needs the index built when training ends: pass "
                                       "build_index=True (and check output_errors if it failed).")
        return self.index.explain(self._module, dataset, indices, num_queries=num_queries, loss_fn=self.loss_fn,
                                  collate_fn=collate_fn, chunk_size=self.chunk_size)

    def _damping(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> DampingSpec:
        """The damping argument for this run: what the user set, or what the optimizer implies."""
        chosen = list(select_params(pl_module, self.params).values())
        return damping_for_optimizers(self.damping, trainer.optimizers, chosen, self.solver.name)

    def _compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", train: DataLoader, query: DataLoader,
                 comm: Optional[Communicator] = None) -> InfluenceResults:
        return compute_influence(
            pl_module, train.dataset, query.dataset, query_indices=self.query_indices, num_queries=self.num_queries,
            loss_fn=self.loss_fn, params=self.params, solver=self._budgeted_solver(),
            damping=self._damping(trainer, pl_module), self_influence=self.self_influence,
            collate_fn=train.collate_fn, query_collate_fn=query.collate_fn,
            chunk_size=self.chunk_size, query_batch_size=self.query_batch_size, dtype=self.dtype,
            progress=checked_progress(trainer, self._progress(trainer), self._interrupt), comm=comm,
            train_indices=self._train_indices, per_token=self.per_token)

    def _budgeted_solver(self) -> SolverSettings:
        """The solver for this run: ``solver="auto"`` with the time budget (:mod:`.budget`) applied, from the
        training time so far (the fit's time less its earlier influence runs)."""
        trained = 0.0
        if self._train_started is not None:
            trained = time.perf_counter() - self._train_started - self._influence_seconds
        return budgeted_solver(self.solver, self.time_budget, trained)

    def _progress(self, trainer: "pl.Trainer") -> Optional[ProgressFn]:
        from .progress import trainer_progress

        return trainer_progress(trainer)


    # ------------------------------------------------------------------ outputs
    def _fit_outputs(self, trainer: "pl.Trainer") -> FitOutputs:
        """This fit's folder and report path, claimed at ``on_train_start`` (:mod:`.outputs`)."""
        if self._outputs is None:  # a run without on_train_start (only when driven by hand): claim now
            self._outputs = fit_outputs(trainer, save_results=self.save_results, report=self.report,
                                        report_path=self.report_path)
        return self._outputs

    def _other_outputs(self, trainer: "pl.Trainer") -> List[Tuple[str, FitOutputs]]:
        """The outputs of the fit's other InfluenceCallbacks that have claimed theirs."""
        return [(f"InfluenceCallback #{i}'s", cb._outputs) for i, cb in enumerate(trainer.callbacks)
                if cb is not self and isinstance(cb, InfluenceCallbackBase) and cb._outputs is not None]

    def _finish(self, trainer: "pl.Trainer", results: InfluenceResults, train: DataLoader, query: DataLoader,
                key: RunKey) -> None:
        """Write every output on global rank zero (no collectives, :func:`~.writer.write_outputs`); each fails
        on its own (its own warning, or one error naming them all for ``on_error="raise"``)."""
        outputs = self._fit_outputs(trainer)
        done = write_outputs(trainer, results, key, store=self.store, folder=outputs.folder,
                             report=self.report, report_path=outputs.report,
                             reporters=self.reporters, train_dataset=train.dataset, query_dataset=query.dataset,
                             render_example=self.render_example, decode=self.decode, top_k=self.top_k)
        self.results_path, self.outputs, self.output_errors = done.results_path, done.outputs, done.failures
        self.error = settle_failures(done.failures, self.on_error, rank_zero_warn) or self.error


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
