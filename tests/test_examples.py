"""The reproduction scripts in ``examples/``: every ``--help``, and each ``--quick`` run (tiny sizes) writes its
table, JSON, PNG and offline W&B run. Only the cheapest quick runs (``clean_in_loop``, ``language_model``) are in the
fast suite."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from .wandb_reader import OfflineRun

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["loo_retraining", "mislabelled", "explain_mistakes", "clean_in_loop", "retraining_check", "language_model"]


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The examples are scripts: they set torch's thread count (``--threads``), Lightning's logging levels
    and warning filters (``quiet_lightning``) for the whole process. Give the rest of the session its own
    back, or later tests that read Lightning's info lines and warnings see nothing."""
    import logging
    import warnings

    import torch

    threads = torch.get_num_threads()
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    filters = list(warnings.filters)
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters


def load(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def run_quick(name: str, tmp_path: Path, capsys, *extra: str) -> str:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchmetrics")
    rc = load(name).main(["--quick", "--out", str(tmp_path / "out"), "--wandb-dir", str(tmp_path / "wandb"), *extra])
    assert rc == 0
    import wandb

    wandb.teardown()
    return capsys.readouterr().out


def offline_run(tmp_path: Path) -> OfflineRun:
    run = OfflineRun.find(tmp_path / "wandb", wait=10)
    assert run.finished
    return run


@pytest.mark.parametrize("name", SCRIPTS + ["digits_demo"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--out" in out


@pytest.mark.slow
def test_mislabelled_quick(tmp_path, capsys):
    out = run_quick("mislabelled", tmp_path, capsys)
    data = json.loads((tmp_path / "out" / "mislabelled.json").read_text())
    (res,) = data["results"]
    assert res["setting"] == "logreg:random"
    assert set(res["found"]) == {"self-influence", "training loss", "random"}
    assert all(len(v) == len(data["fractions"]) == 6 for v in res["found"].values())
    assert all(0.0 <= f <= 1.0 for v in res["found"].values() for f in v)
    assert "| self-influence |" in out and "| training loss |" in out and "| random |" in out
    assert (tmp_path / "out" / "mislabelled.png").stat().st_size > 0
    run = offline_run(tmp_path)
    assert run.table("mislabelled/logreg:random/found").column("method") == ["self-influence", "training loss", "random"]


@pytest.mark.slow
def test_loo_retraining_quick(tmp_path, capsys):
    out = run_quick("loo_retraining", tmp_path, capsys)
    data = json.loads((tmp_path / "out" / "loo.json").read_text())
    assert [r[:2] for r in data["rows"]] == [["logreg", "exact"], ["logreg", "cg"], ["logreg", "ekfac"],
                                            ["cnn", "cg"], ["cnn", "ekfac"]]
    exact = data["rows"][0]
    assert exact[2] > 0.9  # Pearson of the exact solve, even at quick sizes
    assert "| logreg | exact |" in out and "| cnn | cg |" in out
    for kind in ("logreg", "cnn"):
        assert (tmp_path / "out" / f"loo_{kind}.png").stat().st_size > 0
    run = offline_run(tmp_path)
    assert len(run.table("loo/table").rows) == 5


@pytest.mark.slow
def test_explain_mistakes_quick(tmp_path, capsys):
    out = run_quick("explain_mistakes", tmp_path, capsys)
    data = json.loads((tmp_path / "out" / "explain_mistakes.json").read_text())
    assert data["mistakes"] >= 1
    assert Path(data["report"]).is_file() and Path(data["results"]).is_file()
    assert "top 5 harmful" in out and "W&B run" in out
    run = offline_run(tmp_path)
    assert len(run.table("influence/queries").rows) == data["mistakes"]


def test_clean_in_loop_quick(tmp_path, capsys):
    out = run_quick("clean_in_loop", tmp_path, capsys)
    data = json.loads((tmp_path / "out" / "clean_in_loop.json").read_text())
    assert [r[0] for r in data["rows"]] == ["no cleaning", "drop suspects", "relabel suspects", "drop random"]
    assert len(data["per_seed"]) == 2
    assert "| drop suspects |" in out
    assert (tmp_path / "out" / "clean_in_loop.png").stat().st_size > 0
    run = offline_run(tmp_path)
    assert len(run.table("clean_in_loop/table").rows) == 4


@pytest.mark.slow
def test_retraining_check_quick(tmp_path, capsys):
    out = run_quick("retraining_check", tmp_path, capsys)
    rows = json.loads((tmp_path / "out" / "retraining_check.json").read_text())
    assert [(r["group"], r["size"]) for r in rows] == [("harmful", 1), ("harmful", 5), ("helpful", 1), ("helpful", 5)]
    assert all(r["cosine"] > 0.99 for r in rows)  # a first-order prediction of retraining, logistic regression
    assert "| harmful | 1 |" in out and (tmp_path / "out" / "retraining_check.png").stat().st_size > 0
    assert len(offline_run(tmp_path).table("retraining_check/table").rows) == 4


def test_language_model_quick(tmp_path, capsys):
    """The character-level LM: per-token scores of each completion, the HTML heat maps with decoded text and the
    W&B token table (about 10 s)."""
    from lightning_influence import InfluenceResults
    from lightning_influence.reporting.wandb import TOKEN_KEY

    rc = load("language_model").main(["--quick", "--out", str(tmp_path / "out"), "--wandb-dir", str(tmp_path / "wandb")])
    assert rc == 0
    import wandb

    wandb.teardown()
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "language_model.json").read_text())
    assert len(data["queries"]) == 3 and all(len(q["tokens"]) == len(q["completion"]) for q in data["queries"])
    assert "per character, the most helpful window" in out and "sum to 1.0000" in out
    res = InfluenceResults.load(data["results"])
    summed = res.scores.double().new_zeros(res.scores.shape).index_add_(0, res.token_rows, res.token_scores.double())
    assert float((summed - res.scores.double()).abs().max()) <= 1e-4 * float(res.scores.abs().max())
    page = Path(data["report"]).read_text(encoding="utf-8")
    assert page.count('<div class="tokens" id=') == 3 and "token ids" not in page
    table = offline_run(tmp_path).table(TOKEN_KEY)
    assert len(table.rows) == 2 * res.token_scores.shape[0]
    assert {r["token"] for r in table.records()} <= {c for q in data["queries"] for c in q["completion"]}
