"""The W&B report, end to end: a real Trainer with a real offline ``WandbLogger``, read back from the run's
``.wandb`` transaction log (no network, no mocks)."""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, Iterator

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceCallback
from lightning_influence.reporting.wandb import QUERY_COLUMNS
from lightning_influence.results import InfluenceResults

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits
from ..wandb_reader import ImageCell, OfflineRun, wandb_offline_env

wandb = pytest.importorskip("wandb")

TOP_K = 3
NUM_QUERIES = 4


def _wandb_children() -> list:
    """Processes started by this one whose command line mentions wandb (the wandb-core service)."""
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = fh.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ppid == me and "wandb" in cmd:
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> Iterator[Dict[str, Any]]:
    """Trains a tiny classifier on 8×8 digits with an offline WandbLogger and the callback; finishes the
    run (as a user would), tears wandb down and reads the run back."""
    from pytorch_lightning.loggers import WandbLogger

    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in wandb_offline_env(root).items():
            mp.setenv(k, v)
        torch.manual_seed(0)
        train, val = digits(torch.float32, n_train=400, image=True)
        logger = WandbLogger(project="influence-test", save_dir=str(root), offline=True)
        cb = InfluenceCallback(
            num_queries=NUM_QUERIES, solver="exact", top_k=TOP_K, self_influence=True, on_error="raise",
            chunk_size=200,
        )
        trainer = quiet_trainer(root, logger=logger, callbacks=[cb], limit_train_batches=5, max_epochs=2)
        model = LitClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
        trainer.fit(model, *loaders(train, val))
        run_after_fit = wandb.run
        still_active = run_after_fit is not None and run_after_fit is logger.experiment
        wandb.finish()
        wandb.teardown()
        run = OfflineRun.find(root, wait=10)
        yield {
            "cb": cb, "trainer": trainer, "run": run, "root": root, "train": train, "val": val,
            "still_active": still_active, "children": _wandb_children(),
        }


def test_run_left_to_the_user_and_no_process_left(wandb_run):
    assert wandb_run["still_active"], "the library must not finish or replace the user's run"
    assert wandb_run["run"].finished
    assert wandb_run["children"] == []
    assert wandb_run["cb"].error is None


def test_one_history_row_with_global_step(wandb_run):
    run, trainer, cb = wandb_run["run"], wandb_run["trainer"], wandb_run["cb"]
    row = run.row_with("influence/queries")
    assert row["trainer/global_step"] == trainer.global_step
    for key in ("influence/top_examples", "influence/self_influence", "influence/score_histogram",
                "influence/self_influence_histogram", "influence/report", "influence/wall_seconds"):
        assert key in row, key
    assert row["influence/num_train"] == cb.results.num_train
    assert set(cb.outputs["wandb_keys"]) <= set(row)
    assert cb.outputs["wandb_run_dir"] == run.run_dir


def test_queries_table(wandb_run):
    run, res = wandb_run["run"], wandb_run["cb"].results
    table = run.table("influence/queries")
    assert len(table.rows) == NUM_QUERIES
    assert table.columns == QUERY_COLUMNS  # the exact solver has no per-query diagnostics
    recs = table.records()
    val = wandb_run["val"]
    for q, rec in enumerate(recs):
        assert rec["query_id"] == int(res.query_indices[q])
        assert rec["label"] == int(val[rec["query_id"]][1])
        assert rec["prediction"] == int(res.query_predictions[q])
        assert rec["query_loss"] == pytest.approx(float(res.query_losses[q]), rel=1e-5)
        assert rec["harmful_ids"] == res.top_harmful(q, TOP_K).indices.tolist()
        assert rec["helpful_ids"] == res.top_helpful(q, TOP_K).indices.tolist()
        assert rec["harmful_scores"] == pytest.approx(res.top_harmful(q, TOP_K).scores.tolist(), rel=1e-5)
        assert rec["helpful_labels"] == [int(wandb_run["train"][i][1]) for i in rec["helpful_ids"]]
        assert isinstance(rec["preview"], ImageCell) and rec["preview"].png.startswith(b"\x89PNG")
        assert (rec["preview"].width, rec["preview"].height) == (64, 64)  # 8×8 upscaled for visibility
        assert isinstance(rec["harmful_previews"], ImageCell)
        assert rec["harmful_previews"].width > 3 * rec["harmful_previews"].height - 1  # a strip of 3


def test_long_form_table(wandb_run):
    run, res = wandb_run["run"], wandb_run["cb"].results
    table = run.table("influence/top_examples")
    assert len(table.rows) == NUM_QUERIES * 2 * TOP_K
    n = res.settings["num_train_total"]
    recs = table.records()
    for q in range(NUM_QUERIES):
        qid = int(res.query_indices[q])
        harmful = [r for r in recs if r["query_id"] == qid and r["kind"] == "harmful"]
        harmful.sort(key=lambda r: r["rank"])
        assert harmful[0]["train_id"] == int(res.top_harmful(q, 1).indices[0])
        assert [r["train_id"] for r in harmful] == res.top_harmful(q, TOP_K).indices.tolist()
        assert all("lower the query loss" in r["meaning"] for r in harmful)
    for r in recs:
        col = (res.train_indices == r["train_id"]).nonzero().item()
        q = (res.query_indices == r["query_id"]).nonzero().item()
        assert r["score"] == pytest.approx(float(res.scores[q, col]), rel=1e-5)
        assert r["pred_delta_loss"] == pytest.approx(-r["score"] / n, rel=1e-6)
        assert (r["kind"] == "helpful") == (r["score"] < 0)
        assert r["label"] == int(wandb_run["train"][r["train_id"]][1])
        assert isinstance(r["preview"], ImageCell)
        w, h = struct.unpack(">II", r["preview"].png[16:24])
        assert (w, h) == (64, 64)


def test_self_influence_table(wandb_run):
    run, res = wandb_run["run"], wandb_run["cb"].results
    table = run.table("influence/self_influence")
    top = res.top_self_influence(10)
    assert table.column("train_id") == top.indices.tolist()
    assert table.column("self_influence") == pytest.approx(top.scores.tolist(), rel=1e-5)
    assert all(isinstance(c, ImageCell) for c in table.column("preview"))


def test_histogram_summary_config(wandb_run):
    run, res = wandb_run["run"], wandb_run["cb"].results
    hist = run.row_with("influence/score_histogram")["influence/score_histogram"]
    assert hist["_type"] == "histogram"
    assert sum(hist["values"]) == res.scores.numel()
    assert min(hist["bins"]) == pytest.approx(float(res.scores.min()), rel=1e-5)
    s = run.summary
    assert s["influence/solver"] == "exact"
    assert s["influence/damping"] == pytest.approx(res.damping)
    assert s["influence/wall_seconds"] == pytest.approx(res.wall_time)
    assert s["influence/diagnostics/min_eigenvalue"] > 0 and s["influence/diagnostics/hvp_calls"] >= 0
    assert "helpful" in s["influence/sign_convention"] and "harmful" in s["influence/sign_convention"]
    assert s["influence/artifact"] == wandb_run["cb"].outputs["wandb_artifact"]
    assert all(k.startswith(("influence/", "_", "trainer/", "epoch", "train_", "val_")) for k in s)
    c = run.config
    assert c["influence/solver"] == "exact" and c["influence/damping"] == pytest.approx(res.damping)
    assert c["influence/params"] == res.settings["params"]


def test_artifact_holds_loadable_results(wandb_run):
    run, cb = wandb_run["run"], wandb_run["cb"]
    art = run.artifact_of_type("influence-scores")
    assert cb.outputs["wandb_artifact"] == f"{art.name}:latest"
    assert {"results.pt", "report.html"} <= set(art.files)
    loaded = InfluenceResults.load(art.files["results.pt"])
    torch.testing.assert_close(loaded.scores, cb.results.scores)
    assert art.metadata["influence/solver"] == "exact"


def test_html_logged(wandb_run):
    run, cb = wandb_run["run"], wandb_run["cb"]
    path = run.media_file("influence/report")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert "removing it would raise the query loss" in text
    assert os.path.isfile(cb.outputs["html_path"])


def test_artifact_metadata_stays_within_wandbs_key_limit_with_lissa(tmp_path, monkeypatch):
    """LiSSA (preconditioned by Arnoldi, as ``"auto"`` picks it for large training sets) with self-influence has
    the most diagnostics of any solver; W&B refuses an artifact with
    more than 100 metadata keys (``ValueError``), which lost the whole artifact. Read back from the offline run."""
    from lightning_influence import compute_influence
    from lightning_influence.reporting import ReportContext, Wandb, report
    from lightning_influence.reporting.wandb import MAX_METADATA_KEYS

    for k, v in wandb_offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    train, val = digits(torch.float32, n_train=120)
    torch.manual_seed(0)
    res = compute_influence(nn.Linear(64, 10), train, val, num_queries=3, self_influence=True, damping=0.1,
                            solver="lissa")
    assert res.solver == "lissa" and res.self_influence is not None
    run = wandb.init(project="influence-metadata", dir=str(tmp_path), mode="offline")
    out = report(res, [Wandb(run)], ReportContext(train_dataset=train, query_dataset=val, top_k=3))
    wandb.finish()
    wandb.teardown()
    assert out["errors"] == {}
    art = OfflineRun.find(tmp_path, wait=10).artifact_of_type("influence-scores")
    assert 0 < len(art.metadata) <= MAX_METADATA_KEYS == 100
    assert art.metadata["influence/solver"] == "lissa" and "results.pt" in art.files
