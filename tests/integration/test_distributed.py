"""Real 2-process DDP fits (CPU, gloo), launched as a user would: ``tests/ddp_fit.py`` in a subprocess (DDP
re-runs ``sys.argv`` for the other rank, which inside pytest would be pytest itself). Every rank must
finish without an influence error, rank zero must write the results file, the HTML report and the W&B
tables, and every rank must know where the results are. The work split over the processes must give
the single-process scores, and a failure on one rank must stop every rank within seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from types import SimpleNamespace

from lightning_influence import InfluenceConfigError, InfluenceResults
from lightning_influence.distributed import SOLO, shard_bounds
from lightning_influence.integration.strategy import check_strategy, communicator_for

from ..wandb_reader import OfflineRun, wandb_offline_env

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_fit.py")
TIMEOUT_S = 240


def run_ddp(out, *args: str, ok: bool = True) -> str:
    """Run the script with 2 processes; kill the whole process group if it hangs. Returns its output
    (and, with ``ok``, asserts that it exited with 0)."""
    env = {**os.environ, **wandb_offline_env(out / "wandb-home")}
    env.pop("MASTER_PORT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.dirname(SCRIPT))), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, SCRIPT, str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: the script and its second rank
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    if ok:
        assert proc.returncode == 0, output[-4000:]
    else:
        assert proc.returncode != 0, output[-4000:]
    return output


def ranks(out) -> list:
    seen = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote nothing"
        seen.append(json.loads(path.read_text()))
    return seen


def test_ddp_fit_writes_results_report_and_wandb_tables(tmp_path):
    output = run_ddp(tmp_path, "--validate-after")  # trainer.validate after fit must not hang either
    assert "InfluenceCallback failed" not in output, output[-4000:]
    r0, r1 = ranks(tmp_path)
    assert r0["world_size"] == 2 and (r0["error"], r1["error"]) == (None, None)
    assert r0["shape"] == r1["shape"] == [3, 96]  # every training example, in dataset order, on each rank
    # written by rank zero; the same path known on every rank: beside the W&B run's checkpoints, as ModelCheckpoint
    # resolves them (save_dir / project / run id), not in save_dir itself where the next run would overwrite them
    run = OfflineRun.find(tmp_path, wait=10)
    folder = tmp_path / "influence-ddp" / run.run_id / "influence"
    assert r0["results_path"] == r1["results_path"] == str(folder / "results.pt")
    res = InfluenceResults.load(r0["results_path"])
    assert res.scores.shape == (3, 96) and res.self_influence is not None
    assert r0["outputs"]["html_path"] == str(folder / "report.html")
    assert os.path.isfile(r0["outputs"]["html_path"]) and r1["outputs"] == {}
    assert run.run_dir == r0["outputs"]["wandb_run_dir"]
    assert len(run.table("influence/queries").rows) == 3
    assert len(run.table("influence/self_influence").rows) == 10
    assert run.artifact_of_type("influence-scores").files["results.pt"]
    assert run.config["influence/num_train_total"] == 96


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_ddp_split_work_matches_one_process(tmp_path):
    """Each rank scores its half of the training set; every full-data pass is all-reduced. Exact and CG
    agree with one process to float32 round-off, the stochastic and low-rank solvers within their
    tolerance; K-FAC/EK-FAC draw their Fisher labels per process (another draw of the same estimator)."""
    run_ddp(tmp_path, "--logger", "csv", "--compare-solvers", "exact,cg,lissa,arnoldi,ekfac")
    here = [json.loads((tmp_path / f"compare{r}.json").read_text()) for r in range(2)]
    for solver, entry in here[0].items():
        assert entry["processes"] == 2 and entry["shape"] == [3, 96], solver
        assert (entry["scored_here"], here[1][solver]["scored_here"]) == (48, 48), solver  # a shard each
    close = {"exact": 1e-5, "cg": 1e-5, "lissa": 1e-4, "arnoldi": 1e-4}
    for solver, tol in close.items():
        entry = here[0][solver]
        assert entry["scores_rel"] < tol and entry["self_rel"] < tol, (solver, entry)
    assert here[0]["ekfac"]["scores_r"] > 0.98 and here[0]["ekfac"]["self_r"] > 0.98, here[0]["ekfac"]


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_a_failing_rank_is_reported_on_every_rank(tmp_path):
    """Rank 1's solve raises after the collective Hessian pass; under on_error='warn' rank 0 stops at its
    next collective with an error naming rank 1 and its message, and both finish the fit."""
    output = run_ddp(tmp_path, "--logger", "csv", "--fail-rank", "1")
    r0, r1 = ranks(tmp_path)
    assert r1["error"] == "RuntimeError: injected failure on rank 1"
    assert r0["error"].startswith("PeerFailedError") and "rank(s) [1]" in r0["error"], r0["error"]
    assert "injected failure on rank 1" in r0["error"]
    assert "InfluenceCallback failed (PeerFailedError" in output  # rank zero's warning carries rank 1's error
    assert r0["shape"] is None and r1["shape"] is None


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_raise_on_one_rank_ends_every_process_in_seconds(tmp_path):
    """on_error='raise' with a failure on rank 0: rank 1 raises at its next collective instead of
    computing on (or waiting for the backend's timeout); the launch fails fast."""
    t0 = time.perf_counter()
    output = run_ddp(tmp_path, "--logger", "csv", "--fail-rank", "0", "--on-error", "raise", ok=False)
    assert time.perf_counter() - t0 < 60, output[-4000:]  # the script's collective timeout is 60 s
    assert "injected failure on rank 0" in output
    assert "PeerFailedError: influence stopped on rank 1 because rank(s) [0] failed" in output


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_shards_cover_the_training_set_in_order(shards):
    for n in (0, 1, 5, 96, 97):
        bounds = [shard_bounds(n, r, shards) for r in range(shards)]
        assert [b[0] for b in bounds] == [0] + [b[1] for b in bounds[:-1]] and bounds[-1][1] == n
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_sharded_strategies_are_refused_before_training():
    """FSDP needs a GPU to be built, so the check sees a strategy object of that class (both Lightning
    namespaces are recognised by class name); a 2-process DDP strategy is served."""
    import pytorch_lightning as pl

    fsdp = type("FSDPStrategy", (), {})
    with pytest.raises(InfluenceConfigError, match="FSDPStrategy.*strategy='ddp'.*compute_influence"):
        check_strategy(SimpleNamespace(strategy=fsdp(), world_size=1))
    other = type("SomeModelParallel", (), {})
    with pytest.raises(InfluenceConfigError, match="SomeModelParallel with 2 processes.*strategy='ddp'"):
        check_strategy(SimpleNamespace(strategy=other(), world_size=2))
    check_strategy(SimpleNamespace(strategy=object.__new__(pl.strategies.DDPStrategy), world_size=2))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    assert communicator_for(trainer) is SOLO


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_ddp_fit_with_every_n_epochs(tmp_path):
    """Influence after every epoch on both ranks: the same history everywhere, on_results on every rank, the
    per-epoch files written once by rank zero, and the end reusing the last epoch's run on both ranks."""
    output = run_ddp(tmp_path, "--every-n-epochs", "1", "--logger", "csv")
    assert "InfluenceCallback failed" not in output, output[-4000:]
    r0, r1 = ranks(tmp_path)
    assert (r0["errors"], r1["errors"]) == ({}, {})
    assert r0["history"] == r1["history"] == [0, 1]
    assert r0["on_results"] == r1["on_results"] == [0, 1]  # the end reused epoch 1's run: no third call
    assert r0["history_paths"] == r1["history_paths"]
    for epoch, path in r0["history_paths"].items():
        assert path == str(tmp_path / "lightning_logs" / "version_0" / "influence" / f"results_epoch{epoch}.pt")
        assert InfluenceResults.load(path).scores.shape == (3, 96)
    assert os.path.isfile(r0["results_path"])


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_on_results_failing_on_one_rank_is_reported_on_every_rank(tmp_path):
    """on_results raises on rank 1 at epoch 0: under on_error='warn' rank 0 learns it at once (the callback's
    failure agreement), both keep training in step, and epoch 1 is computed on both."""
    output = run_ddp(tmp_path, "--every-n-epochs", "1", "--logger", "csv", "--fail-on-results", "1")
    r0, r1 = ranks(tmp_path)
    assert r1["errors"] == {"0": "RuntimeError: on_results failed on rank 1"}
    assert list(r0["errors"]) == ["0"] and r0["errors"]["0"].startswith("PeerFailedError")
    assert "on_results failed on rank 1" in r0["errors"]["0"]
    assert "InfluenceCallback failed (PeerFailedError" in output and "at the end of epoch 0" in output
    assert r0["history"] == r1["history"] == [0, 1] and r0["on_results"] == r1["on_results"] == [0, 1]
    assert (r0["error"], r1["error"]) == (None, None)  # the last run (the end, reusing epoch 1) went well


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_an_unwritable_report_stops_every_rank_before_training(tmp_path):
    """Rank zero (the only writer) checks the outputs before training and broadcasts its verdict: every
    rank raises the same error at once instead of one rank leaving the other in a training collective."""
    (tmp_path / "a_directory").mkdir()
    t0 = time.perf_counter()
    output = run_ddp(tmp_path, "--logger", "csv", "--report-path", str(tmp_path / "a_directory"), ok=False)
    assert time.perf_counter() - t0 < 60, output[-4000:]
    for rank in (0, 1):
        assert f"[rank{rank}]: lightning_influence.errors.InfluenceConfigError: report_path: " in output, output[-4000:]


@pytest.mark.slow
def test_ddp_spawn_splits_the_work_and_rank_zero_writes_the_results(tmp_path):
    """Under ddp_spawn the ranks are worker processes: rank zero writes the results file (every training
    example, in dataset order); the launching process gets the weights back but not the callback's
    attributes (Lightning returns only the model), so it reads the results from that file."""
    run_ddp(tmp_path, "--logger", "csv", "--start-method", "spawn")
    (path,) = list(tmp_path.glob("lightning_logs/version_*/influence/results.pt"))
    res = InfluenceResults.load(str(path))
    assert res.scores.shape == (3, 96) and res.settings["processes"] == 2 and res.self_influence is not None
    launcher = json.loads((tmp_path / "rank0.json").read_text())
    assert launcher["error"] is None and launcher["shape"] is None


# ---------------------------------------------------------------- issue #21: nothing waits, nothing deadlocks
@pytest.mark.slow
def test_a_check_failing_on_one_rank_only_stops_every_rank_with_its_message(tmp_path):
    """A check before training that fails on rank 1 alone reached rank 0 only as gloo's 'Connection closed by
    peer' from the first gradient all-reduce. Now every rank raises the check's own message (and fix) before
    training, at once."""
    t0 = time.perf_counter()
    output = run_ddp(tmp_path, "--logger", "csv", "--fail-check-rank", "1", ok=False)
    assert time.perf_counter() - t0 < 60, output[-4000:]
    assert "Connection closed by peer" not in output, output[-4000:]
    message = "injected check failure on rank 1: pass fix=..."
    assert f"[rank1]: lightning_influence.errors.InfluenceConfigError: {message}" in output, output[-4000:]
    assert (f"[rank0]: lightning_influence.errors.InfluenceConfigError: {message} [found on rank 1; every rank "
            "stops here]") in output, output[-4000:]
    r0, r1 = ranks(tmp_path)
    assert r0["raised"].startswith("InfluenceConfigError") and r1["raised"].startswith("InfluenceConfigError")
    assert not list(tmp_path.rglob("results*.pt"))  # nothing trained, nothing written


@pytest.mark.slow
def test_a_stopped_rank_ends_the_influence_run_on_every_rank_within_the_collective_timeout(tmp_path):
    """Rank 1 is stopped (SIGSTOP) in its solve for 6 s; with collective_timeout=2 rank 0 gives up after 2 s
    instead of Lightning's 60 s here (30 minutes by default), and rank 1, once continued, learns at its next
    collective that rank 0 left. Both warn, keep training's results and finish the fit."""
    output = run_ddp(tmp_path, "--logger", "csv", "--stop-rank", "1", "--stop-seconds", "6",
                     "--collective-timeout", "2")
    r0, r1 = ranks(tmp_path)
    assert r0["error"].startswith("CollectiveTimeoutError: influence stopped on rank 0: the other ranks did not "
                                  "join its all-gather"), r0["error"]
    assert "within collective_timeout=2 s" in r0["error"] and "collective_timeout=..." in r0["error"]
    assert 1.5 < r0["error_seconds"] < 5, r0  # measured: about 2.0 s after the first solve began
    assert r1["error"].startswith("PeerFailedError: influence stopped on rank 1"), r1["error"]
    assert "another rank left the influence computation" in r1["error"]
    assert r1["error_seconds"] > 5.5, r1  # it was stopped for 6 s; then at once
    assert "InfluenceCallback failed (CollectiveTimeoutError" in output
    assert (r0["raised"], r1["raised"]) == (None, None) and r0["world_size"] == 2


@pytest.mark.slow
def test_sigterm_during_influence_ends_it_on_every_rank(tmp_path):
    """SIGTERM to rank 0 in its solve: Lightning's handler forwards it to rank 1 and broadcasts on the default
    process group, which deadlocked against the influence all-gather there. The influence phase has its own
    group now: both ranks stop it together (StopRequested) and Lightning then ends the fit as it does on SIGTERM."""
    t0 = time.perf_counter()
    output = run_ddp(tmp_path, "--logger", "csv", "--sigterm-rank", "0", "--collective-timeout", "30",
                     "--every-n-epochs", "1")  # at epoch 0's run; Lightning then ends the fit (SIGTERMException, exit 0)
    assert time.perf_counter() - t0 < 60, output[-4000:]
    r0, r1 = ranks(tmp_path)
    for r in (r0, r1):
        assert r["error"].startswith("StopRequested: SIGTERM (received on rank(s) ["), r
        assert "stopped the influence computation on every rank" in r["error"], r
        assert r["error_seconds"] < 10, r  # not the 30 s collective timeout: at the next collective
        assert r["raised"].startswith("SIGTERMException"), r
    assert "InfluenceCallback: SIGTERM" in output
