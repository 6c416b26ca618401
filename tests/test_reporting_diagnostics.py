"""Solver diagnostics in the reports, against hand-built results with known numbers: LiSSA's per-query
standard errors and depths concatenated over query chunks, the scalars every logger gets, the W&B queries
table and norm-history chart read back from an offline run, and the HTML report. Exact, CG and empty
diagnostics must report what they have and nothing of LiSSA's."""

from __future__ import annotations

import re
from typing import Any, Dict, List

import pytest
import torch

from lightning_influence.reporting import report_influence
from lightning_influence.reporting.content import norm_series, query_views, suspects
from lightning_influence.reporting.html import render_html
from lightning_influence.reporting.previews import ExampleCatalog
from lightning_influence.reporting.scalars import diagnostic_scalars, summary_scalars
from lightning_influence.results import InfluenceResults

from .problems import digits

NAN = float("nan")
Q, N, QB = 5, 12, 3
QUERY_IDS = [4, 9, 1, 30, 7]
#: per-query values as the two chunks recorded them (rows 0–2, then 3–4); one NaN
STDERR = [0.125, NAN, 0.5, 0.0625, 0.25]
DEPTH = [200, 400, 400, 100, 200]
LISSA_KEYS = ("relative_stderr", "depth_max", "depth_min", "lambda_", "trace", "setup_hvps", "scale", "norm_history",
              "segment_change", "batch_size")


def _lissa_chunk(stderr: List[float], depth_q: List[int], depth: List[int], hist: List[List[float]],
                 steps: List[List[int]], changes: List[List[float]], hvps: int) -> Dict[str, Any]:
    return {
        "scale": 12.5, "damping": 0.01, "batch_size": 64, "depth_mode": "auto",
        "depth": depth, "depth_per_query": depth_q, "converged": True, "relative_stderr": stderr,
        "norm_history": hist, "checkpoint_steps": steps, "segment_change": changes,
        "setup": {"hvps": 120, "lambda_max_full": 4.0, "lambda_min_full": -0.5, "trace": 30.0, "trace_stderr": 1.5,
                  "lambda_max_minibatch": [10.0, 12.5, 11.0], "lambda_extra": 0.75, "curvature_check_passes": 60,
                  "tangent_chunk": 32},
        "hvp_calls": hvps,
    }


def _results(diagnostics: Dict[str, Any], solver: str = "lissa") -> InfluenceResults:
    g = torch.Generator().manual_seed(0)
    return InfluenceResults(
        scores=torch.randn(Q, N, generator=g), query_indices=torch.tensor(QUERY_IDS), train_indices=torch.arange(N),
        query_losses=torch.rand(Q, generator=g),
        settings={"solver": solver, "damping": 0.01, "damping_mode": "auto", "query_batch_size": QB,
                  "num_train_total": N},
        diagnostics=diagnostics, timings={"total": 1.0},
    )


def lissa_results() -> InfluenceResults:
    return _results({
        "solve": [
            _lissa_chunk(STDERR[:3], DEPTH[:3], [400, 400], [[1.0, 2.0, 2.5], [1.0, 2.25, 2.375]],
                         [[50, 100, 150], [50, 100, 150]], [[0.1, 0.01], [0.1, 0.02]], 800),
            _lissa_chunk(STDERR[3:], DEPTH[3:], [200, 150], [[1.0, 1.5], [1.0, 1.625]],
                         [[50, 100], [50, 100]], [[0.005], [0.004]], 350),
        ],
        "hvp_calls": 1300,
    })


#: what diagnostic_scalars must give for lissa_results(), exactly
EXPECTED_LISSA = {
    "scale": 12.5, "damping": 0.01, "batch_size": 64, "converged": True,
    "relative_stderr_median": 0.1875,  # median of 0.0625, 0.125, 0.25, 0.5 (the NaN ignored)
    "relative_stderr_max": 0.5,
    "depth_max": 400, "depth_min": 100,
    "norm_history_final": 2.5,  # largest final value over chunks and repeats
    "segment_change_final": 0.02,
    "lambda_max_full": 4.0, "lambda_min_full": -0.5, "trace": 30.0, "trace_stderr": 1.5,
    "lambda_max_minibatch_max": 12.5, "lambda_extra": 0.75, "setup_hvps": 120,
    "curvature_check_passes": 60, "tangent_chunk": 32,
    "solve_hvp_calls": 1150, "hvp_calls": 1300,
}


@pytest.fixture(scope="module")
def catalogs():
    train, val = digits(torch.float32, n_train=N, image=True)
    return train, val


def _html(results: InfluenceResults, catalogs) -> str:
    train, val = catalogs
    return render_html(results, query_views(results, 2), suspects(results, 3), ExampleCatalog(train), ExampleCatalog(val))


# ---------------------------------------------------------------------------------------------- data


def test_per_query_diagnostics_concatenated_in_chunk_order():
    res = lissa_results()
    assert [(c.start, c.stop) for c in res.solve_chunks()] == [(0, 3), (3, 5)]
    pq = res.per_query_diagnostics()
    assert set(pq) == {"relative_stderr", "depth_per_query"}
    assert pq["relative_stderr"].dtype == torch.float64 and pq["relative_stderr"].shape == (Q,)
    torch.testing.assert_close(pq["relative_stderr"], torch.tensor(STDERR, dtype=torch.float64), equal_nan=True)
    assert pq["depth_per_query"].tolist() == DEPTH
    views = query_views(res, 2)
    assert [v.relative_stderr for v in views] == [0.125, None, 0.5, 0.0625, 0.25]
    assert [v.depth for v in views] == DEPTH


def test_per_query_diagnostics_missing_in_one_chunk_is_nan():
    res = lissa_results()
    del res.diagnostics["solve"][0]["relative_stderr"]  # e.g. an older file; chunk sizes from depth_per_query
    pq = res.per_query_diagnostics()
    assert [c.stop for c in res.solve_chunks()] == [3, 5]
    assert bool(pq["relative_stderr"][:3].isnan().all())
    assert pq["relative_stderr"][3:].tolist() == [0.0625, 0.25]


def test_norm_series_per_chunk_and_repeat():
    series = norm_series(lissa_results())
    assert [(s.chunk, s.repeat, s.start, s.stop, s.depth) for s in series] == [
        (0, 0, 0, 3, 400), (0, 1, 0, 3, 400), (1, 0, 3, 5, 200), (1, 1, 3, 5, 150)]
    assert series[1].steps == [50, 100, 150] and series[1].ratios == [1.0, 2.25, 2.375]
    assert series[3].segment_change == [0.004]
    assert series[2].label == "chunk 1 (queries 3–4), repeat 0"


# ---------------------------------------------------------------------------------------------- scalars


def test_lissa_scalars_exact_values():
    res = lissa_results()
    d = diagnostic_scalars(res)
    assert d == {f"influence/diagnostics/{k}": v for k, v in EXPECTED_LISSA.items()}
    for misleading in ("relative_stderr_final", "depth_per_query_final", "depth_final", "checkpoint_steps_final"):
        assert f"influence/diagnostics/{misleading}" not in d
    s = summary_scalars(res)  # what every Lightning logger gets: floats
    assert s["influence/diagnostics/relative_stderr_median"] == 0.1875
    assert s["influence/diagnostics/converged"] == 1.0 and s["influence/diagnostics/lambda_max_full"] == 4.0
    assert all(isinstance(v, float) for v in s.values())


def test_all_nan_stderr_is_left_out():
    res = lissa_results()
    for chunk in res.diagnostics["solve"]:  # repeats = 1
        chunk["relative_stderr"] = [NAN] * len(chunk["relative_stderr"])
    d = diagnostic_scalars(res)
    assert not any("relative_stderr" in k for k in d)
    assert d["influence/diagnostics/depth_max"] == 400 and d["influence/diagnostics/depth_min"] == 100


def test_exact_solver_diagnostics(catalogs):
    chunks = [{"min_eigenvalue": 0.5, "max_eigenvalue": 9.0, "num_params": 650},
              {"min_eigenvalue": 0.25, "max_eigenvalue": 8.0, "num_params": 650}]
    res = _results({"solve": chunks, "hvp_calls": 0}, solver="exact")
    assert diagnostic_scalars(res) == {
        "influence/diagnostics/min_eigenvalue": 0.25, "influence/diagnostics/max_eigenvalue": 9.0,
        "influence/diagnostics/num_params": 650, "influence/diagnostics/hvp_calls": 0,
    }
    assert res.per_query_diagnostics() == {} and norm_series(res) == []
    assert all(v.relative_stderr is None and v.depth is None for v in query_views(res, 2))
    text = _html(res, catalogs)
    table = re.search(r'<table class="kv" id="diagnostics-table">.*?</table>', text, re.S).group(0)
    assert "<td>min_eigenvalue</td><td>0.25</td>" in table and "<td>max_eigenvalue</td><td>9</td>" in table
    for absent in ('id="lissa-table"', 'id="per-query-diagnostics"', 'class="norm-history"', "rel. std. error"):
        assert absent not in text


def test_cg_diagnostics():
    chunks = [{"iterations": 12, "converged": True, "max_relative_residual": 1e-7, "residual_history": [0.5, 1e-7]},
              {"iterations": 15, "converged": False, "max_relative_residual": 2e-6, "residual_history": [0.4, 2e-6]}]
    d = diagnostic_scalars(_results({"solve": chunks, "hvp_calls": 40}, solver="cg"))
    assert d == {
        "influence/diagnostics/iterations": 15, "influence/diagnostics/converged": False,
        "influence/diagnostics/max_relative_residual": 2e-6, "influence/diagnostics/residual_history_final": 2e-6,
        "influence/diagnostics/hvp_calls": 40,
    }


@pytest.mark.parametrize(
    "diagnostics",
    [{}, {"solve": []}, {"hvp_calls": 5}, {"solve": [{}]}, {"solve": [None, "x"]}, {"solve": {"depth": 10}},
     {"solve": [{"scale": 2.0, "norm_history": [], "relative_stderr": [], "setup": {}}]},
     {"solve": [{"norm_history": [[1.0, "x"]], "checkpoint_steps": [[5]], "depth": [3]}]}],
    ids=["empty", "no-chunks", "only-hvps", "empty-chunk", "not-dicts", "one-dict", "partial-lissa", "malformed"],
)
def test_empty_or_partial_diagnostics(diagnostics, catalogs):
    res = _results(diagnostics)
    d = diagnostic_scalars(res)
    assert not any(k.endswith(("relative_stderr_median", "lambda_max_full", "setup_hvps", "trace")) for k in d)
    if not diagnostics.get("solve"):
        assert not any(any(name in k for name in LISSA_KEYS) for k in d)
    assert norm_series(res) == []
    views = query_views(res, 2)
    assert all(v.relative_stderr is None for v in views)
    text = _html(res, catalogs)  # no crash, no empty LiSSA blocks
    assert 'class="norm-history"' not in text and 'id="per-query-diagnostics"' not in text
    summary_scalars(res)


# ---------------------------------------------------------------------------------------------- HTML


def test_html_shows_lissa_diagnostics(catalogs):
    text = _html(lissa_results(), catalogs)
    assert not re.search(r'(src|href)="(?!data:|#)', text) and "<script" not in text
    assert '<a href="#solver-diagnostics">' in text and '<h3 id="solver-diagnostics">' in text

    lissa = re.search(r'<table class="kv" id="lissa-table">.*?</table>', text, re.S).group(0)
    rows = dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>", lissa))
    assert rows["damping λ"] == "0.01" and rows["scale s"] == "12.5" and rows["minibatch size"] == "64"
    assert rows["steps run"] == "100–400" and rows["repeats"] == "2" and rows["converged"] == "yes"
    assert rows["relative std. error of the scores"] == "median 18.8 %, max 50 %"
    assert rows["λ_max(H)"] == "4" and rows["λ_min(H)"] == "-0.5" and rows["trace(H)"] == "30 ± 1.5"
    assert rows["λ_max(H_B + λI)"] == "10, 12.5, 11" and rows["lambda_extra"] == "0.75"
    assert rows["HVPs in setup"] == "120" and rows["HVPs in the solve"] == "1150"
    assert rows["curvature check"] == "60" and rows["right-hand sides per HVP"] == "32"
    assert "chosen automatically; the solver targets (H + λI)⁻¹v" in lissa  # settings' damping_mode

    table = re.search(r'<table class="grid" id="per-query-diagnostics">.*?</table>', text, re.S).group(0)
    cells = re.findall(r'<tr data-row="(\d)" data-query-id="(\d+)" data-relative-stderr="([^"]*)" data-depth="(\d*)">', table)
    assert [int(r) for r, *_ in cells] == list(range(Q))
    assert [int(q) for _, q, *_ in cells] == QUERY_IDS
    assert [float(s) for *_, s, _ in cells][::2] == [0.125, 0.5, 0.25] and cells[1][2] == "nan"
    assert [int(d) for *_, d in cells] == DEPTH
    first = re.search(r'<article class="query" id="query-4".*?</article>', text, re.S).group(0)
    assert "score rel. std. error 12.5 %" in first and "LiSSA steps 200" in first
    second = re.search(r'<article class="query" id="query-9".*?</article>', text, re.S).group(0)
    assert "rel. std. error" not in second and "LiSSA steps 400" in second

    svg = re.search(r'<svg class="norm-history" id="norm-history".*?</svg>', text, re.S).group(0)
    assert svg.count("<polyline") == 4 and "chunk 1 (queries 3–4), repeat 1" in svg
    hist = re.search(r'<table class="grid" id="norm-history-table">.*?</table>', text, re.S).group(0)
    assert re.findall(r'data-chunk="(\d)" data-repeat="(\d)" data-final="([^"]+)"', hist) == [
        ("0", "0", "2.5"), ("0", "1", "2.375"), ("1", "0", "1.5"), ("1", "1", "1.625")]
    assert "<td>relative_stderr_median</td><td>0.1875</td>" in text  # the raw values, as logged


# ---------------------------------------------------------------------------------------------- W&B


def test_wandb_logs_lissa_diagnostics(tmp_path, catalogs):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("PIL", reason="wandb.Image needs Pillow")
    from pytorch_lightning.loggers import WandbLogger

    from .lit_models import quiet_trainer
    from .test_reporting_wandb import wandb_offline_env
    from .wandb_reader import OfflineRun

    train, val = catalogs
    res = lissa_results()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in wandb_offline_env(tmp_path).items():
            mp.setenv(k, v)
        logger = WandbLogger(project="influence-diagnostics-test", save_dir=str(tmp_path), offline=True)
        trainer = quiet_trainer(tmp_path, logger=logger)
        out = report_influence(trainer, None, res, train_dataset=train, query_dataset=val,  # type: ignore[arg-type]
                               report_path=tmp_path / "report.html", top_k=2)
        wandb.finish()
        wandb.teardown()
        run = OfflineRun.find(tmp_path, wait=10)

    recs = run.table("influence/queries").records()
    assert [r["query_id"] for r in recs] == QUERY_IDS
    assert [r["relative_stderr"] for r in recs] == [0.125, None, 0.5, 0.0625, 0.25]
    assert [r["lissa_depth"] for r in recs] == DEPTH

    key = "influence/lissa_norm_history_table"
    assert key in out["wandb_keys"] and set(out["wandb_keys"]) <= set(run.row_with(key))
    hist = run.table(key)
    assert hist.columns == ["series", "chunk", "first_query", "last_query", "repeat", "step", "norm_ratio"]
    assert [tuple(r[1:]) for r in hist.rows] == [
        (0, 0, 2, 0, 50, 1.0), (0, 0, 2, 0, 100, 2.0), (0, 0, 2, 0, 150, 2.5),
        (0, 0, 2, 1, 50, 1.0), (0, 0, 2, 1, 100, 2.25), (0, 0, 2, 1, 150, 2.375),
        (1, 3, 4, 0, 50, 1.0), (1, 3, 4, 0, 100, 1.5), (1, 3, 4, 1, 50, 1.0), (1, 3, 4, 1, 100, 1.625),
    ]
    chart = run.config["_wandb"]["visualize"]["influence/lissa_norm_history"]
    assert chart["panel_config"]["fieldSettings"] == {"x": "step", "y": "norm_ratio", "stroke": "series"}

    s = run.summary
    for name, value in EXPECTED_LISSA.items():
        assert s[f"influence/diagnostics/{name}"] == value, name
    assert "influence/diagnostics/relative_stderr_final" not in s
    assert "‖h_t‖/‖v‖" in s["influence/lissa_norm_history_meaning"]
    row = run.row_with("influence/queries")
    assert row["influence/diagnostics/relative_stderr_max"] == 0.5
