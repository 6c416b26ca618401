"""Reports without a Trainer: ``compute_influence`` results handed to the reporters directly (a CSV logger,
the HTML report, a plain ``wandb.init`` run), read back from disk; a reporter of the user's own; each
reporter failing on its own."""

from __future__ import annotations

import csv
import glob
import os

import pytest
import torch
from torch import nn

from lightning_influence import compute_influence
from lightning_influence.reporting import Html, ReportContext, Scalars, Wandb, report
from lightning_influence.reporting.wandb import QUERY_COLUMNS

from ..problems import digits
from ..wandb_reader import OfflineRun, wandb_offline_env

wandb = pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def results_and_data():
    torch.manual_seed(0)
    train, val = digits(torch.float32, n_train=200)
    model = nn.Linear(64, 10)
    res = compute_influence(model, train, val, num_queries=3, solver="exact", damping=0.1, self_influence=True)
    return res, train, val


def test_every_reporter_writes_without_a_trainer(tmp_path, results_and_data, monkeypatch):
    from pytorch_lightning.loggers import CSVLogger

    res, train, val = results_and_data
    for k, v in wandb_offline_env(tmp_path / "wandb").items():
        monkeypatch.setenv(k, v)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    run = wandb.init(project="influence-no-trainer", dir=str(tmp_path / "wandb"), mode="offline")
    try:
        ctx = ReportContext(train_dataset=train, query_dataset=val, top_k=4, step=7)
        out = report(res, [Scalars([csv_logger]), Html(tmp_path / "r.html"), Wandb(run)], ctx)
    finally:
        wandb.finish()
    assert out["errors"] == {}
    # the HTML report: every query and its top examples
    html = open(out["html_path"], encoding="utf-8").read()
    for q in res.query_indices.tolist():
        assert f"query {q}" in html.lower() or f"#{q}" in html
    # the CSV logger: the summary scalars at the given step
    (metrics,) = glob.glob(os.path.join(csv_logger.log_dir, "metrics.csv"))
    rows = list(csv.DictReader(open(metrics)))
    assert rows[-1]["step"] == "7" and float(rows[-1]["influence/num_queries"]) == 3
    # the W&B run: the queries table with the same columns as the callback's, and the artifact
    wb = OfflineRun.find(tmp_path / "wandb", wait=10)
    table = wb.table("influence/queries")
    assert table.columns == list(QUERY_COLUMNS) and len(table.rows) == 3
    assert wb.artifact_of_type("influence-scores").files["results.pt"]
    assert wb.row_with("influence/queries")["trainer/global_step"] == 7


def test_a_users_reporter_and_contained_failures(tmp_path, results_and_data):
    res, train, val = results_and_data
    seen = []

    class Printer:
        name = "printer"

        def __call__(self, results, context):
            seen.append((results.scores.shape[0], len(context.views(results)), len(context.suspects(results))))
            return {"printed": True}

    class Broken:
        name = "broken"

        def __call__(self, results, context):
            raise OSError(28, "No space left on device")

    out = report(res, [Broken(), Printer(), Html(tmp_path / "r.html")],
                 ReportContext(train_dataset=train, query_dataset=val, top_k=3, self_influence_k=5))
    assert list(out["errors"]) == ["broken"] and isinstance(out["errors"]["broken"], OSError)
    assert out["printed"] and os.path.isfile(out["html_path"])
    assert seen == [(3, 3, 5)]


def test_in_loop_context_writes_scalars_with_the_epoch_and_no_html(tmp_path, results_and_data):
    res, train, _ = results_and_data

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((dict(metrics), step))

        def save(self):
            pass

    rec = Recorder()
    out = report(res, [Scalars([rec]), Html(tmp_path / "r.html")],
                 ReportContext(train_dataset=train, epoch=2, step=30, history={2: res}))
    assert out["errors"] == {} and "html_path" not in out and not (tmp_path / "r.html").exists()
    (metrics, step), = rec.calls
    assert step == 30 and metrics["influence/epoch"] == 2.0 and "influence/num_queries" in metrics
