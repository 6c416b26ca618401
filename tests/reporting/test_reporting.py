"""Reporting without W&B: scalars to every logger, the HTML report at its default path, progress bars that
follow the trainer's settings, and no ``wandb`` import when no WandbLogger is used."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_influence import InfluenceCallback
from lightning_influence.integration.progress import PhaseBars, trainer_progress
from lightning_influence.integration.reporting import report_influence
from lightning_influence.reporting.scalars import config_values, diagnostic_scalars, summary_values

from ..lit_models import DictDataset, LitClassifier, LitDictClassifier, loaders, quiet_trainer
from ..problems import digits


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=200, image=True)


class RecordingLogger(pl.loggers.Logger):
    """Any other Lightning logger: keeps what it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.logged = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((dict(metrics), step))


def _model() -> LitClassifier:
    torch.manual_seed(0)
    return LitClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


def test_scalars_to_every_logger_and_html_at_default_path(tmp_path, data, capsys):
    train, val = data
    loggers = [pl.loggers.CSVLogger(str(tmp_path)), RecordingLogger()]
    cb = InfluenceCallback(num_queries=2, solver="exact", top_k=4, on_error="raise", params=["net.1.bias"])
    trainer = quiet_trainer(tmp_path, logger=loggers, callbacks=[cb], limit_train_batches=2, enable_progress_bar=True)
    trainer.fit(_model(), *loaders(train, val))
    out = cb.outputs
    assert out["html_path"] == os.path.join(trainer.log_dir, "influence", "report.html")
    assert os.path.isfile(out["html_path"]) and out["wandb_run_dir"] is None and out["wandb_artifact"] is None
    with open(os.path.join(loggers[0].log_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    row = next(r for r in rows if r.get("influence/wall_seconds"))
    assert float(row["influence/damping"]) == pytest.approx(cb.results.damping)
    assert float(row["influence/num_train"]) == len(train)
    logged = [m for m, _ in loggers[1].logged if "influence/wall_seconds" in m]
    assert len(logged) == 1 and logged[0]["influence/num_queries"] == 2.0
    # progress bars, one per phase, in Lightning's style; the timings are in the results
    printed = capsys.readouterr()
    assert "Influence: query gradients" in printed.out + printed.err
    assert "Influence: scoring training set" in printed.out + printed.err
    assert {"query_gradients", "solve", "scoring", "total"} <= set(cb.results.timings)
    with open(out["html_path"], encoding="utf-8") as fh:
        text = fh.read()
    assert text.count('class="example helpful"') == 2 * 4 and text.count('class="example harmful"') == 2 * 4
    assert "Self-influence was not computed" in text


def test_no_progress_when_bar_disabled(tmp_path, data, capsys):
    assert trainer_progress(quiet_trainer(tmp_path, enable_progress_bar=False)) is None
    progress = trainer_progress(quiet_trainer(tmp_path, enable_progress_bar=True))
    assert isinstance(progress, PhaseBars)
    train, val = data
    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise", params=["net.1.bias"])
    quiet_trainer(tmp_path, callbacks=[cb], limit_train_batches=1, enable_progress_bar=False).fit(
        _model(), *loaders(train, val)
    )
    printed = capsys.readouterr()
    assert "Influence:" not in printed.out + printed.err


def test_phase_bars_close_per_phase(capsys):
    bars = PhaseBars()
    bars("scoring", 10, 20)
    assert bars._bar.n == 10 and bars._bar.total == 20
    bars("scoring", 20, 20)
    assert bars._bar is None  # closed when complete
    bars("solve", 1, 4)
    bars("self_influence", 2, 4)  # a new phase closes the previous bar
    bars.close()
    err = capsys.readouterr()
    text = err.out + err.err
    assert "Influence: scoring training set" in text and "Influence: self-influence" in text


def test_dict_examples_and_render_example(tmp_path, data):
    train, val = data
    xs, ys = train.tensors
    vx, vy = val.tensors
    cb = InfluenceCallback(
        num_queries=2, solver="exact", top_k=2, on_error="raise", params=["net.1.bias"],
        report_path=tmp_path / "r" / "custom.html",
        render_example=lambda ex: f"digit labelled {int(ex['label'])}",
    )
    module = LitDictClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    trainer = quiet_trainer(tmp_path, callbacks=[cb], limit_train_batches=1)
    trainer.fit(module, *loaders(DictDataset(xs, ys), DictDataset(vx, vy)))
    assert cb.outputs["html_path"] == str(tmp_path / "r" / "custom.html")
    with open(cb.outputs["html_path"], encoding="utf-8") as fh:
        text = fh.read()
    assert "digit labelled" in text and "<img" not in text.split('id="queries"')[1].split('id="histograms"')[0]


def test_summary_values_and_config(data):
    from lightning_influence.diagnostics import Diagnostic
    from lightning_influence.results import InfluenceResults

    def chunk(start, stop, final):
        curve = {"label": "repeat 0", "x": [10, 20], "y": [1.0, final]}
        return {"start": start, "stop": stop, "items": [
            Diagnostic("steps_max", 100, "most steps", reduce="max").to_dict(),
            Diagnostic("norm_history", [curve], "‖h_t‖/‖v‖", kind="series").to_dict()]}

    res = InfluenceResults(
        scores=torch.tensor([[1.0, -2.0], [0.5, 0.25]]), query_indices=torch.tensor([0, 1]),
        train_indices=torch.tensor([0, 1]), query_losses=torch.tensor([0.5, 0.25]),
        settings={"solver": "lissa", "depth": 100, "scale": 10.0, "damping": 0.01, "params": ["a", "b"]},
        diagnostics={"solver": "lissa",
                     "setup": [Diagnostic("scale", 10.0, "scale s").to_dict(),
                               Diagnostic("preconditioner", "none", "preconditioner").to_dict()],
                     "solve": [chunk(0, 1, 2.5), chunk(1, 2, 3.0)],
                     "totals": [Diagnostic("hvp_calls", 200, "Hessian-vector products", reduce="sum").to_dict()]},
        timings={"solve": 1.0, "total": 2.0},
    )
    d = diagnostic_scalars(res)
    assert d == {"influence/diagnostics/scale": 10.0, "influence/diagnostics/steps_max": 100,
                 "influence/diagnostics/hvp_calls": 200}  # series are charts, not scalars
    s = summary_values(res)
    assert s["influence/solver"] == "lissa" and "influence/depth" not in s  # the settings are the config's
    assert s["influence/diagnostics/preconditioner"] == "none"
    assert s["influence/wall_seconds"] == 2.0 and s["influence/seconds_solve"] == 1.0
    assert all(k.startswith("influence/") for k in s)
    c = config_values(res)
    assert c["influence/params"] == ["a", "b"] and c["influence/depth"] == 100 and c["influence/scale"] == 10.0
    assert not [k for k in c if k.startswith("influence/setup/")]  # diagnostics are in the summary, once


def test_other_ranks_join_the_run_folder_collective_then_report_nothing(tmp_path):
    """Rank zero resolves the run's folder and broadcasts it: every rank must join, or rank zero waits forever."""

    class Strategy:
        calls = 0

        def broadcast(self, value, src=0):
            Strategy.calls += 1
            return str(tmp_path)

    class Rank1:
        is_global_zero = False
        world_size = 2
        default_root_dir = str(tmp_path)
        strategy = Strategy()

    assert report_influence(Rank1(), None, None, train_dataset=None, query_dataset=None) == {}  # type: ignore[arg-type]
    assert Strategy.calls == 1
    report_influence(Rank1(), None, None, train_dataset=None, query_dataset=None, report_path=tmp_path / "r.html")  # type: ignore[arg-type]
    assert Strategy.calls == 1  # an explicit path needs no collective


@pytest.mark.slow  # moved out of the fast suite (>8 s); runs under -m slow
def test_wandb_not_imported_without_wandb_logger(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from torch import nn
        from tests.lit_models import LitClassifier, loaders, quiet_trainer
        from tests.problems import digits
        from lightning_influence import InfluenceCallback
        train, val = digits(torch.float32, n_train=100)
        cb = InfluenceCallback(num_queries=1, solver="exact", on_error="raise", params=["net.bias"])
        quiet_trainer({str(tmp_path)!r}, callbacks=[cb], limit_train_batches=1).fit(LitClassifier(), *loaders(train, val))
        assert cb.outputs["html_path"]
        print("WANDB_IMPORTED", "wandb" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WANDB_IMPORTED False" in done.stdout
