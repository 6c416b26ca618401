"""A real 2-process DDP fit (CPU, gloo), launched as a user would: ``tests/ddp_fit.py`` in a subprocess (DDP
re-runs ``sys.argv`` for the other rank, which inside pytest would be pytest itself). Every rank must
finish without an influence error, rank zero must write the results file, the HTML report and the W&B
tables, and every rank must know where the results are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from lightning_influence import InfluenceResults

from .test_reporting_wandb import wandb_offline_env
from .wandb_reader import OfflineRun

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_fit.py")
TIMEOUT_S = 240


def run_ddp(out, *args: str) -> str:
    """Run the script with 2 processes; kill the whole process group if it hangs. Returns its output."""
    env = {**os.environ, **wandb_offline_env(out / "wandb-home")}
    env.pop("MASTER_PORT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(SCRIPT)), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, SCRIPT, str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: the script and its second rank
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def ranks(out) -> list:
    seen = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote nothing"
        seen.append(json.loads(path.read_text()))
    return seen


def test_ddp_fit_writes_results_report_and_wandb_tables(tmp_path):
    output = run_ddp(tmp_path)
    assert "InfluenceCallback failed" not in output, output[-4000:]
    r0, r1 = ranks(tmp_path)
    assert r0["world_size"] == 2 and (r0["error"], r1["error"]) == (None, None)
    assert r0["shape"] == r1["shape"] == [3, 96]  # every training example, in dataset order, on each rank
    # written by rank zero; the same path known on every rank
    assert r0["results_path"] == r1["results_path"] == str(tmp_path / "influence" / "results.pt")
    res = InfluenceResults.load(r0["results_path"])
    assert res.scores.shape == (3, 96) and res.self_influence is not None
    assert r0["outputs"]["html_path"] == str(tmp_path / "influence" / "report.html")
    assert os.path.isfile(r0["outputs"]["html_path"]) and r1["outputs"] == {}
    run = OfflineRun.find(tmp_path, wait=10)
    assert run.run_dir == r0["outputs"]["wandb_run_dir"]
    assert len(run.table("influence/queries").rows) == 3
    assert len(run.table("influence/self_influence").rows) == 10
    assert run.artifact_of_type("influence-scores").files["results.pt"]
    assert run.config["influence/num_train_total"] == 96


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
