"""A 2-process DDP fit on the CPU (gloo) with ``InfluenceCallback`` and a logger, as a user would launch it.

Run as a script, never imported by pytest: DDP starts the other rank by re-running ``sys.argv``, so inside
pytest it would re-run pytest. ``tests/test_distributed.py`` runs it in a subprocess. Each rank writes
what it saw to ``<out>/rank<r>.json``::

    python tests/ddp_fit.py OUT [--namespace lightning.pytorch] [--logger wandb|csv] [--solver exact]
        [--fail-rank R] [--every-n-epochs K] [--fail-on-results R] [--on-error warn|raise] [--validate-after] [--compare-solvers exact,cg,...]
        [--fail-check-rank R] [--stop-rank R --stop-seconds S] [--sigterm-rank R] [--collective-timeout T]

``--fail-check-rank R`` makes the callback's check before training (``preflight``) fail on rank ``R`` only;
``--stop-rank R`` stops rank ``R`` (SIGSTOP) in its first solve for ``--stop-seconds`` (a helper sends SIGCONT);
``--sigterm-rank R`` sends SIGTERM to rank ``R`` in its first solve (as a scheduler would). The rank files are
written even when the fit raises (``"raised"``: the exception), with ``error_seconds``: seconds from the first
solve to the end of the influence run.

``--fail-rank R`` makes the exact solver's solve raise on rank ``R`` only (after the collective Hessian
pass); ``--compare-solvers`` then runs, on every rank after the fit, ``compute_influence`` split over the
strategy's processes for each listed solver, and on rank zero the same call in one process, and writes
``compare<rank>.json`` (largest relative difference, Pearson r, seconds, examples scored per rank).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root

N_TRAIN, N_VAL, DIM, CLASSES = 96, 32, 8, 3


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, DIM, generator=g)
    y = (x[:, :CLASSES] + 0.5 * torch.randn(len(x), CLASSES, generator=g)).argmax(1)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


#: the Lightning namespace, fixed at import: a spawned rank re-imports this module (without running
#: ``main``) to unpickle the model, so its class must live at module level
NAMESPACE = "lightning.pytorch" if "lightning.pytorch" in sys.argv else "pytorch_lightning"
_pl = importlib.import_module(NAMESPACE)


class Classifier(_pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, weight_decay=1e-2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--namespace", default="pytorch_lightning", choices=["pytorch_lightning", "lightning.pytorch"])
    parser.add_argument("--logger", default="wandb", choices=["wandb", "csv"])
    parser.add_argument("--solver", default="exact")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--on-error", default="warn", choices=["warn", "raise"])
    parser.add_argument("--validate-after", action="store_true")
    parser.add_argument("--compare-solvers", default="")
    parser.add_argument("--report-path", default=None)
    parser.add_argument("--start-method", default="popen", choices=["popen", "spawn"])
    parser.add_argument("--every-n-epochs", type=int, default=None)
    parser.add_argument("--fail-on-results", type=int, default=None, help="on_results raises on this rank at epoch 0")
    parser.add_argument("--fail-check-rank", type=int, default=None)
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--stop-seconds", type=float, default=4.0)
    parser.add_argument("--sigterm-rank", type=int, default=None)
    parser.add_argument("--collective-timeout", type=float, default=None)
    args = parser.parse_args()
    rank_env = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))

    pl = importlib.import_module(args.namespace)
    strategies = importlib.import_module(f"{args.namespace}.strategies")
    if args.namespace == "lightning.pytorch":
        from lightning_influence.lightning import InfluenceCallback
    else:
        from lightning_influence import InfluenceCallback

    if args.logger == "wandb":
        logger = pl.loggers.WandbLogger(project="influence-ddp", save_dir=args.out, offline=True)
    else:
        logger = pl.loggers.CSVLogger(args.out)
    if args.fail_rank is not None:
        from lightning_influence.solvers.exact import ExactSolver

        def failing_solve(self, rhs, _solve=ExactSolver.solve):
            if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == args.fail_rank:
                raise RuntimeError(f"injected failure on rank {args.fail_rank}")
            return _solve(self, rhs)

        ExactSolver.solve = failing_solve
    times = {}
    if args.stop_rank is not None or args.sigterm_rank is not None:
        import signal
        import subprocess
        import time

        from lightning_influence.solvers.exact import ExactSolver

        def interrupted_solve(self, rhs, _solve=ExactSolver.solve):
            if "first_solve" not in times:
                times["first_solve"] = time.monotonic()
                if rank_env == args.stop_rank:
                    subprocess.Popen(["sh", "-c", f"sleep {args.stop_seconds}; kill -CONT {os.getpid()}"])
                    os.kill(os.getpid(), signal.SIGSTOP)
                if rank_env == args.sigterm_rank:
                    os.kill(os.getpid(), signal.SIGTERM)
            return _solve(self, rhs)

        ExactSolver.solve = interrupted_solve
    if args.fail_check_rank is not None:
        import lightning_influence.integration.callback as callback_module
        from lightning_influence import InfluenceConfigError

        def failing_preflight(*a, _preflight=callback_module.preflight, **kw):
            if rank_env == args.fail_check_rank:
                raise InfluenceConfigError(f"injected check failure on rank {args.fail_check_rank}: pass fix=...")
            return _preflight(*a, **kw)

        callback_module.preflight = failing_preflight
    calls = []

    def on_results(trainer, module, results):
        calls.append(results.settings["epoch"])
        if trainer.global_rank == args.fail_on_results and results.settings["epoch"] == 0:
            raise RuntimeError(f"on_results failed on rank {args.fail_on_results}")

    extra = {} if args.collective_timeout is None else {"collective_timeout": args.collective_timeout}
    cb = InfluenceCallback(num_queries=3, solver=args.solver, top_k=3, self_influence=True, on_error=args.on_error,
                           report_path=args.report_path,
                           every_n_epochs=args.every_n_epochs,
                           on_results=None if args.start_method == "spawn" else on_results,  # spawn pickles it
                           **extra)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=2, logger=logger, callbacks=[cb], default_root_dir=args.out,
        strategy=strategies.DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60),
                                        start_method=args.start_method),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    torch.manual_seed(0)
    train, val = data()
    model = Classifier()
    raised = None
    if args.stop_rank is not None or args.sigterm_rank is not None:
        finished = cb._run

        def timed_run(*a, **kw):  # when the influence run ended, from the first solve
            try:
                return finished(*a, **kw)
            finally:
                if "first_solve" in times and "error_seconds" not in times:
                    times["error_seconds"] = time.monotonic() - times["first_solve"]

        cb._run = timed_run
    try:
        trainer.fit(model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    except BaseException as err:  # SIGTERM ends the fit with Lightning's SIGTERMException: still say what was seen
        raised = f"{type(err).__name__}: {err}"
        write_seen(args, trainer, cb, calls, raised, times)
        raise
    if args.validate_after:
        trainer.validate(model, DataLoader(val, batch_size=16), verbose=False)
    if args.compare_solvers:
        compare(trainer, model, cb, train, val, args.compare_solvers.split(","), args.out)
    write_seen(args, trainer, cb, calls, raised, times)
    if args.logger == "wandb" and trainer.is_global_zero:
        import wandb

        wandb.finish()
    return 0


def write_seen(args, trainer, cb, calls, raised, times) -> None:
    """What this rank saw, to ``<out>/rank<r>.json``."""
    seen = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "error": None if cb.error is None else f"{type(cb.error).__name__}: {cb.error}",
        "shape": None if cb.results is None else list(cb.results.scores.shape),
        "results_path": cb.results_path,
        "outputs": {k: v for k, v in cb.outputs.items() if isinstance(v, str)},
        "history": cb.history.epochs(),
        "history_paths": {str(e.epoch): p for e, p in cb.history_paths.items()},
        "on_results": calls,
        "errors": {str(e.epoch): f"{type(x).__name__}: {x}" for e, x in cb.errors.items()},
        "raised": raised,
        "error_seconds": times.get("error_seconds"),
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(seen, fh)


def compare(trainer, model, cb, train, val, solvers, out) -> None:
    """Every rank: ``compute_influence`` over the strategy's processes; rank zero: also in one process."""
    from lightning_influence import compute_influence
    from lightning_influence.integration.strategy import communicator_for

    import time

    kw = dict(query_indices=cb.results.query_indices.tolist(), damping=cb.results.settings["damping"],
              self_influence=True, chunk_size=16)
    report = {}
    for solver in solvers:
        scored = {}
        t0 = time.perf_counter()
        split = compute_influence(model, train, val, solver=solver, comm=communicator_for(trainer),
                                  progress=lambda phase, done, total: scored.__setitem__(phase, done), **kw)
        t_split = time.perf_counter() - t0
        entry = {"seconds_split": t_split, "processes": split.settings["processes"],
                 "scored_here": scored.get("scoring"), "shape": list(split.scores.shape)}
        if trainer.is_global_zero:
            t0 = time.perf_counter()
            one = compute_influence(model, train, val, solver=solver, **kw)
            entry["seconds_one"] = time.perf_counter() - t0

            def rel(a, b):
                return float((a - b).abs().max() / b.abs().max())

            def pearson(a, b):
                a, b = a.flatten().double(), b.flatten().double()
                return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

            entry.update(scores_rel=rel(split.scores, one.scores), scores_r=pearson(split.scores, one.scores),
                         self_rel=rel(split.self_influence, one.self_influence),
                         self_r=pearson(split.self_influence, one.self_influence))
        report[solver] = entry
    with open(os.path.join(out, f"compare{trainer.global_rank}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    sys.exit(main())
