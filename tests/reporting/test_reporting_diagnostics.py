"""Solver diagnostics in the results and the reports, against hand-built results with known numbers.

The results hold typed diagnostics (:class:`~lightning_influence.diagnostics.Diagnostic` as dicts) in the
layout ``{"solver", "setup", "solve": [{"start", "stop", "items"}], "self_influence", "totals"}``. The
reporters read them by kind, label and meaning only, so the LiSSA, CG and exact data below are test data:
per-query values concatenated over chunks, scalars combined by their declared reduction, one chart per
series diagnostic, the W&B queries table and charts read back from an offline run."""

from __future__ import annotations

import io
import math
import re
import tokenize
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from lightning_influence.diagnostics import Diagnostic
from lightning_influence.errors import InfluenceConfigError
from lightning_influence.integration.reporting import report_influence
from lightning_influence.reporting.content import SUSPECTS, query_views, series_lines, suspects
from lightning_influence.reporting.html import render_html
from lightning_influence.reporting.previews import ExampleCatalog
from lightning_influence.reporting.scalars import config_values, diagnostic_scalars, summary_scalars, summary_values
from lightning_influence.results import InfluenceResults, diagnostics_layout

from ..problems import digits

NAN = float("nan")
Q, N = 5, 12
QUERY_IDS = [4, 9, 1, 30, 7]
#: per-query values as the two chunks recorded them (rows 0–2, then 3–4); one NaN
STDERR = [0.125, NAN, 0.5, 0.0625, 0.25]
DEPTH = [200, 400, 400, 100, 200]
NORM_LABEL = "‖h_t‖/‖v‖ (max over the chunk's queries)"
NORM_MEANING = "Levels off when the recursion converges; geometric growth means divergence."


def _d(name: str, value: Any, label: str, meaning: str = "", kind: str = "scalar", reduce: str = "first") -> Dict[str, Any]:
    return Diagnostic(name, value, label, meaning, reduce=reduce, kind=kind).to_dict()


def _curves(xs: List[List[float]], ys: List[List[float]]) -> List[Dict[str, Any]]:
    return [{"label": f"repeat {r}", "x": x, "y": y} for r, (x, y) in enumerate(zip(xs, ys))]


LISSA_SETUP = [
    _d("damping", 0.01, "damping λ", "chosen automatically; Hessian units"),
    _d("damping_base", 0.001, "damping base λ₀"),
    _d("lambda_min_estimate", -0.5, "λ_min(H) estimate (undamped)", "Lanczos", reduce="min"),
    _d("lambda_max_estimate", 4.0, "λ_max(H) estimate", "power iteration"),
    _d("spectrum_passes", 60, "spectrum passes"),
    _d("preconditioner", "none", "preconditioner", "what scales the residual"),
    _d("scale", 12.5, "scale s", "each step divides the residual by s"),
    _d("batch_size", 64, "minibatch size"),
    _d("trace", 30.0, "trace(H)"),
    _d("lambda_max_minibatch", 12.5, "largest λ_max(H_B + λI)", reduce="max"),
    _d("tangent_chunk", 32, "right-hand sides per HVP"),
    _d("setup_hvps", 120, "HVPs in setup"),
]


def _lissa_chunk(start: int, stop: int, converged: bool, hvps: int, steps_max: int,
                 xs: List[List[float]], ys: List[List[float]], change: List[List[float]]) -> Dict[str, Any]:
    return {"start": start, "stop": stop, "items": [
        _d("converged", converged, "converged", "every query met the tolerance", reduce="all"),
        _d("hvp_calls", hvps, "HVPs in the query solves", reduce="sum"),
        _d("steps_max", steps_max, "most LiSSA steps", reduce="max"),
        _d("relative_stderr", STDERR[start:stop], "relative std. error of the scores", "over repeats / √R",
           kind="per_query"),
        _d("depth", DEPTH[start:stop], "LiSSA steps", kind="per_query"),
        _d("norm_history", _curves(xs, ys), NORM_LABEL, NORM_MEANING, kind="series"),
        _d("segment_change", _curves([x[1:] for x in xs], change), "segment change", "relative change of the scores",
           kind="series"),
    ]}


def _results(diagnostics: Dict[str, Any], solver: str = "lissa", self_influence: bool = False) -> InfluenceResults:
    g = torch.Generator().manual_seed(0)
    return InfluenceResults(
        scores=torch.randn(Q, N, generator=g), query_indices=torch.tensor(QUERY_IDS), train_indices=torch.arange(N),
        query_losses=torch.rand(Q, generator=g),
        self_influence=-torch.rand(N, generator=g) if self_influence else None,
        settings={"solver": solver, "damping": 0.01, "num_train_total": N},
        diagnostics=diagnostics, timings={"total": 1.0},
    )


def lissa_results() -> InfluenceResults:
    return _results({
        "solver": "lissa",
        "setup": LISSA_SETUP,
        "solve": [
            _lissa_chunk(0, 3, True, 800, 400, [[50, 100, 150]] * 2, [[1.0, 2.0, 2.5], [1.0, 2.25, 2.375]],
                         [[0.1, 0.01], [0.1, 0.02]]),
            _lissa_chunk(3, 5, False, 350, 200, [[50, 100]] * 2, [[1.0, 1.5], [1.0, 1.625]], [[0.005], [0.004]]),
        ],
        "self_influence": [_d("converged", True, "converged", reduce="all"),
                           _d("hvp_calls", 500, "HVPs in the query solves", reduce="sum")],
        "totals": [_d("hvp_calls", 1770, "Hessian-vector products", "setup, solves and self-influence", reduce="sum")],
    }, self_influence=True)


#: summary_diagnostics() of lissa_results(): setup, chunks combined, self-influence, totals
EXPECTED_SUMMARY = [
    ("damping", 0.01), ("damping_base", 0.001), ("lambda_min_estimate", -0.5), ("lambda_max_estimate", 4.0),
    ("spectrum_passes", 60), ("preconditioner", "none"), ("scale", 12.5), ("batch_size", 64), ("trace", 30.0),
    ("lambda_max_minibatch", 12.5), ("tangent_chunk", 32), ("setup_hvps", 120),
    ("converged", False), ("hvp_calls", 1150), ("steps_max", 400),  # all, sum, max over the two chunks
    ("self_influence_converged", True), ("self_influence_hvp_calls", 500), ("total_hvp_calls", 1770),
]
#: diagnostic_scalars() of lissa_results(), exactly: the numeric and boolean scalars, and the per-query ones
EXPECTED_SCALARS = {
    **{name: v for name, v in EXPECTED_SUMMARY if not isinstance(v, str)},
    "relative_stderr_median": 0.1875,  # median of 0.0625, 0.125, 0.25, 0.5 (the NaN ignored)
    "relative_stderr_max": 0.5,
    "depth_median": 200.0, "depth_max": 400.0,
}


@pytest.fixture(scope="module")
def catalogs():
    return digits(torch.float32, n_train=N, image=True)


def _html(results: InfluenceResults, catalogs) -> str:
    train, val = catalogs
    return render_html(results, query_views(results, 2), suspects(results, 3), ExampleCatalog(train), ExampleCatalog(val))


def _table(text: str, css_id: str) -> str:
    return re.search(rf'<table class="[^"]*" id="{css_id}">.*?</table>', text, re.S).group(0)


# ---------------------------------------------------------------------------------------------- data


def test_solve_chunks_and_per_query_concatenated_in_order():
    res = lissa_results()
    chunks = res.solve_chunks()
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 5)]
    assert all(isinstance(d, Diagnostic) for c in chunks for d in c.items)
    assert [d.name for d in chunks[1].items] == ["converged", "hvp_calls", "steps_max", "relative_stderr", "depth",
                                                 "norm_history", "segment_change"]
    assert [d.name for d in res.setup_diagnostics()] == [d["name"] for d in LISSA_SETUP]
    pq = res.per_query_diagnostics()
    assert list(pq) == ["relative_stderr", "depth"]
    assert all(v.dtype == torch.float64 and v.shape == (Q,) for v in pq.values())
    torch.testing.assert_close(pq["relative_stderr"], torch.tensor(STDERR, dtype=torch.float64), equal_nan=True)
    assert pq["depth"].tolist() == DEPTH
    views = query_views(res, 2)
    assert [v.diagnostics["relative_stderr"] for v in views] == [0.125, None, 0.5, 0.0625, 0.25]
    assert [v.diagnostics["depth"] for v in views] == DEPTH
    assert views[0].diagnostic_labels == {"relative_stderr": "relative std. error of the scores", "depth": "LiSSA steps"}


def test_per_query_missing_in_one_chunk_is_nan():
    res = lissa_results()
    items = res.diagnostics["solve"][0]["items"]
    items[:] = [d for d in items if d["name"] != "relative_stderr"]
    pq = res.per_query_diagnostics()
    assert list(pq) == ["depth", "relative_stderr"]  # first seen in chunk 1
    assert bool(pq["relative_stderr"][:3].isnan().all()) and pq["relative_stderr"][3:].tolist() == [0.0625, 0.25]
    assert [v.diagnostics["relative_stderr"] for v in query_views(res, 1)] == [None, None, None, 0.0625, 0.25]


@pytest.mark.parametrize("solve, message", [
    ([{"start": 0, "stop": 6, "items": []}], r"0 <= start <= stop <= 5"),
    ([{"items": []}], r"diagnostics\['solve'\]\[0\]"),
    ({"start": 0, "stop": 5}, "must be a list of chunks"),
    ([{"start": 0, "stop": 5, "items": [_d("depth", [1, 2], "LiSSA steps", kind="per_query")]}],
     "'depth' of solve chunk 0 .* must hold 5 values, got 2"),
])
def test_malformed_layout_is_named(solve, message):
    res = _results({"solve": solve})
    with pytest.raises(InfluenceConfigError, match=message):
        res.per_query_diagnostics()


def test_diagnostic_lookup():
    res = lissa_results()
    d = res.diagnostic("norm_history")
    assert (d.label, d.meaning, d.kind) == (NORM_LABEL, NORM_MEANING, "series")
    assert res.diagnostic("lambda_min_estimate").label == "λ_min(H) estimate (undamped)"
    assert res.diagnostic("hvp_calls").label == "HVPs in the query solves"  # the first occurrence: chunk 0
    assert res.diagnostic("hvp_calls").value == 800
    assert res.diagnostic("nope") is None
    assert res.solver == "lissa"


def test_summary_diagnostics_order_reduction_and_duplicates():
    res = lissa_results()
    summary = res.summary_diagnostics()
    assert [(d.name, d.value) for d in summary] == EXPECTED_SUMMARY
    by_name = {d.name: d for d in summary}
    assert by_name["total_hvp_calls"].label == "Hessian-vector products (whole run)"
    assert by_name["total_hvp_calls"].meaning == "setup, solves and self-influence"
    assert by_name["self_influence_converged"].label == "converged (self-influence solves)"
    assert by_name["scale"].label == "scale s"
    assert all(d.kind == "scalar" for d in summary)


def test_series_lines_per_chunk_and_curve():
    series = series_lines(lissa_results())
    assert list(series) == ["norm_history", "segment_change"]
    norm = series["norm_history"]
    assert [(s.chunk, s.start, s.stop, s.curve) for s in norm] == [
        (0, 0, 3, "repeat 0"), (0, 0, 3, "repeat 1"), (1, 3, 5, "repeat 0"), (1, 3, 5, "repeat 1")]
    assert norm[1].x == [50.0, 100.0, 150.0] and norm[1].y == [1.0, 2.25, 2.375]
    assert all((s.label, s.meaning) == (NORM_LABEL, NORM_MEANING) for s in norm)
    assert norm[2].line_label == "chunk 1 (queries 3–4), repeat 0"
    assert series["segment_change"][3].y == [0.004]


# ---------------------------------------------------------------------------------------------- scalars


def test_lissa_scalars_exact_values():
    res = lissa_results()
    assert diagnostic_scalars(res) == {f"influence/diagnostics/{k}": v for k, v in EXPECTED_SCALARS.items()}
    s = summary_scalars(res)  # what every Lightning logger gets: floats, booleans as 0/1
    assert all(isinstance(v, float) for v in s.values())
    assert s["influence/diagnostics/converged"] == 0.0 and s["influence/diagnostics/self_influence_converged"] == 1.0
    assert s["influence/diagnostics/relative_stderr_median"] == 0.1875 and s["influence/diagnostics/hvp_calls"] == 1150
    v = summary_values(res)
    assert v["influence/diagnostics/preconditioner"] == "none" and v["influence/diagnostics/converged"] is False
    assert v["influence/solver"] == "lissa"
    c = config_values(res)
    assert v["influence/diagnostics/scale"] == 12.5 and v["influence/diagnostics/lambda_min_estimate"] == -0.5
    assert c["influence/solver"] == "lissa" and not [k for k in c if k.startswith("influence/setup/")]


def test_all_nan_per_query_is_left_out():
    res = lissa_results()
    for chunk in res.diagnostics["solve"]:  # one repeat: no standard error
        for d in chunk["items"]:
            if d["name"] == "relative_stderr":
                d["value"] = [NAN] * len(d["value"])
    d = diagnostic_scalars(res)
    assert not any("relative_stderr" in k for k in d)
    assert d["influence/diagnostics/depth_max"] == 400.0


def _exact_results() -> InfluenceResults:
    return _results({
        "solver": "exact",
        "setup": [_d("min_eigenvalue", 0.25, "λ_min(H + λI) (damped)", "smallest eigenvalue, Hessian units"),
                  _d("max_eigenvalue", 9.0, "λ_max(H + λI) (damped)", "largest eigenvalue, Hessian units"),
                  _d("num_params", 650, "parameters")],
        "solve": [{"start": 0, "stop": 3, "items": []}, {"start": 3, "stop": 5, "items": []}],
        "totals": [_d("hvp_calls", 0, "Hessian-vector products", reduce="sum")],
    }, solver="exact")


def test_exact_solver_diagnostics(catalogs):
    res = _exact_results()
    assert diagnostic_scalars(res) == {
        "influence/diagnostics/min_eigenvalue": 0.25, "influence/diagnostics/max_eigenvalue": 9.0,
        "influence/diagnostics/num_params": 650, "influence/diagnostics/hvp_calls": 0,
    }
    assert res.per_query_diagnostics() == {} and series_lines(res) == {}
    assert all(v.diagnostics == {} for v in query_views(res, 2))
    text = _html(res, catalogs)
    rows = re.findall(r'<tr data-name="(\w+)"><td>(.*?)</td><td>(.*?)</td><td class="note">(.*?)</td>',
                      _table(text, "diagnostics-table"))
    assert rows == [
        ("min_eigenvalue", "λ_min(H + λI) (damped)", "0.25", "smallest eigenvalue, Hessian units"),
        ("max_eigenvalue", "λ_max(H + λI) (damped)", "9", "largest eigenvalue, Hessian units"),
        ("num_params", "parameters", "650", ""),
        ("hvp_calls", "Hessian-vector products", "0", ""),
    ]
    assert "Solver diagnostics (exact)" in text
    for absent in ('id="per-query-diagnostics"', 'class="series-chart"', "LiSSA"):
        assert absent not in text


def test_cg_diagnostics(catalogs):
    def chunk(start, stop, it, conv, res_, hist):
        return {"start": start, "stop": stop, "items": [
            _d("iterations", it, "CG iterations", reduce="max"), _d("converged", conv, "converged", reduce="all"),
            _d("max_relative_residual", res_, "largest ‖r‖/‖b‖", reduce="max"),
            _d("residual_history", [{"label": "max over queries", "x": list(range(len(hist))), "y": hist}],
               "relative residual ‖r_k‖/‖b‖", "falls geometrically while CG converges", kind="series")]}

    res = _results({"solver": "cg", "solve": [chunk(0, 3, 12, True, 1e-7, [0.5, 1e-3, 1e-7]),
                                              chunk(3, 5, 15, False, 2e-6, [0.4, 2e-6])]}, solver="cg")
    assert diagnostic_scalars(res) == {
        "influence/diagnostics/iterations": 15, "influence/diagnostics/converged": False,
        "influence/diagnostics/max_relative_residual": 2e-6,
    }
    text = _html(res, catalogs)
    figures = re.findall(r'<figure class="series" data-name="(\w+)">(.*?)</figure>', text, re.S)
    assert [name for name, _ in figures] == ["residual_history"]
    svg = figures[0][1]
    assert 'aria-label="relative residual ‖r_k‖/‖b‖"' in svg and svg.count("<polyline") == 2
    assert "(log scale)" in svg  # positive values over more than three decades
    assert "<figcaption>falls geometrically while CG converges</figcaption>" in svg
    assert "chunk 1 (queries 3–4), max over queries" in svg


@pytest.mark.parametrize("diagnostics", [{}, {"solver": "exact"}, {"setup": [], "solve": [], "totals": []},
                                         {"solve": [{"start": 0, "stop": 5, "items": []}]}])
def test_empty_diagnostics(diagnostics, catalogs):
    res = _results(diagnostics)
    assert diagnostic_scalars(res) == {} and res.summary_diagnostics() == [] and series_lines(res) == {}
    assert all(v.diagnostics == {} for v in query_views(res, 2))
    text = _html(res, catalogs)
    assert 'id="solver-diagnostics"' not in text and 'href="#solver-diagnostics"' not in text
    summary_scalars(res)


def test_reporters_name_no_diagnostic():
    """The reporters and results read kinds, labels and meanings: no solver or diagnostic name appears as
    a string literal in their code (docstrings aside). Settings keys such as ``"damping"`` are not
    diagnostics and may be read by name."""
    names = {"lissa", "cg", "exact", "ekfac", "kfac", "arnoldi", "scale", "depth", "relative_stderr",
             "norm_history", "segment_change", "converged", "hvp_calls", "min_eigenvalue", "iterations",
             "residual_history", "depth_per_query", "steps_max"}
    root = Path(__file__).resolve().parents[2] / "lightning_influence"
    for path in [root / "results.py", *sorted((root / "reporting").glob("*.py"))]:
        tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))
        for tok in tokens:
            if tok.type == tokenize.STRING and not tok.string.startswith(('"""', "'''")):
                text = tok.string.lstrip("rbfuRBFU")[1:-1]
                assert text not in names, f"{path.name}:{tok.start[0]} names the diagnostic or solver {text!r}"


# ---------------------------------------------------------------------------------------------- HTML


def test_html_shows_lissa_diagnostics(catalogs):
    res = lissa_results()
    text = _html(res, catalogs)
    assert not re.search(r'(src|href)="(?!data:|#)', text) and "<script" not in text
    assert '<a href="#solver-diagnostics">' in text and "Solver diagnostics (lissa)" in text

    rows = re.findall(r'<tr data-name="(\w+)"><td>(.*?)</td><td>(.*?)</td><td class="note">(.*?)</td>',
                      _table(text, "diagnostics-table"))
    assert [r[0] for r in rows] == [name for name, _ in EXPECTED_SUMMARY]
    table = {name: (label, value, meaning) for name, label, value, meaning in rows}
    assert table["scale"] == ("scale s", "12.5", "each step divides the residual by s")
    assert table["lambda_min_estimate"] == ("λ_min(H) estimate (undamped)", "-0.5", "Lanczos")
    assert table["preconditioner"][1] == "none" and table["converged"][1] == "no"
    assert table["hvp_calls"][1] == "1150" and table["steps_max"][1] == "400"
    assert table["total_hvp_calls"] == ("Hessian-vector products (whole run)", "1770", "setup, solves and self-influence")
    assert table["self_influence_converged"][:2] == ("converged (self-influence solves)", "yes")

    pq = _table(text, "per-query-diagnostics")
    heads = re.findall(r'<th data-name="(\w+)"[^>]*>(.*?)</th>', pq)
    assert heads == [("relative_stderr", "relative std. error of the scores"), ("depth", "LiSSA steps")]
    rows = re.findall(r'<tr data-row="(\d)" data-query-id="(\d+)">(.*?)</tr>', pq)
    assert [int(r) for r, _, _ in rows] == list(range(Q)) and [int(q) for _, q, _ in rows] == QUERY_IDS
    cells = [dict(re.findall(r'<td data-name="(\w+)" data-value="([^"]*)">', row)) for *_, row in rows]
    assert [c["relative_stderr"] for c in cells] == ["0.125", "nan", "0.5", "0.0625", "0.25"]
    assert [float(c["depth"]) for c in cells] == DEPTH
    assert '<td data-name="relative_stderr" data-value="nan">n/a</td>' in pq

    first = re.search(r'<article class="query" id="query-4".*?</article>', text, re.S).group(0)
    assert "relative std. error of the scores 0.125" in first and "LiSSA steps 200" in first
    second = re.search(r'<article class="query" id="query-9".*?</article>', text, re.S).group(0)
    assert "relative std. error" not in second and "LiSSA steps 400" in second

    figures = dict(re.findall(r'<figure class="series" data-name="(\w+)">(.*?)</figure>', text, re.S))
    assert list(figures) == ["norm_history", "segment_change"]
    norm = figures["norm_history"]
    assert '<svg class="series-chart" id="series-norm_history"' in norm
    assert f'aria-label="{NORM_LABEL}"' in norm.replace("&#x27;", "'")
    assert norm.count("<polyline") == 4 and "chunk 1 (queries 3–4), repeat 1" in norm
    assert f"<figcaption>{NORM_MEANING}</figcaption>" in norm
    assert "(log scale)" not in norm
    seg = figures["segment_change"]  # chunk 1 has one point per repeat: drawn as dots
    assert seg.count("<polyline") == 2 and seg.count("<circle") == 2

    values = _table(text, "series-table-norm_history")
    assert re.findall(r'data-chunk="(\d)" data-curve="([^"]+)" data-last="([^"]+)"', values) == [
        ("0", "repeat 0", "2.5"), ("0", "repeat 1", "2.375"), ("1", "repeat 0", "1.5"), ("1", "repeat 1", "1.625")]


def test_html_self_influence_heading(catalogs):
    text = _html(lissa_results(), catalogs)
    heading = re.search(r'<h3 class="suspects">(.*?)</h3>', text).group(1)
    assert heading == ("The 3 training examples with the most negative self-influence I_up,loss(z, z): the examples "
                       "the model bends most to fit (often mislabelled or atypical)")
    assert "most negative" in SUSPECTS and "highest" not in SUSPECTS


# ---------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip_and_old_format_refused(tmp_path):
    res = lissa_results()
    res.save(tmp_path / "r.pt")
    loaded = InfluenceResults.load(tmp_path / "r.pt")
    assert [(d.name, d.value) for d in loaded.summary_diagnostics()] == EXPECTED_SUMMARY
    torch.testing.assert_close(loaded.per_query_diagnostics()["relative_stderr"],
                               res.per_query_diagnostics()["relative_stderr"], equal_nan=True)
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    state["format_version"] = 1
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(InfluenceConfigError, match=r"old\.pt is an InfluenceResults file of format 1; .* reads format 2"):
        InfluenceResults.load(tmp_path / "old.pt")
    torch.save({"scores": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InfluenceConfigError, match=r"other\.pt is not an InfluenceResults file"):
        InfluenceResults.load(tmp_path / "other.pt")


def test_diagnostics_layout_builds_what_results_read():
    """What a pipeline stores: plain dicts that survive weights_only saving and read back typed."""
    setup = [Diagnostic("scale", 2.0, "scale s")]
    c0 = [Diagnostic("depth", [3, 4], "steps", kind="per_query"), Diagnostic("hvp_calls", 7, "HVPs", reduce="sum")]
    c1 = [Diagnostic("depth", [5], "steps", kind="per_query"), Diagnostic("hvp_calls", 2, "HVPs", reduce="sum")]
    layout = diagnostics_layout("lissa", setup, [(0, 2, c0), (2, 3, c1)],
                                totals=[Diagnostic("hvp_calls", 11, "HVPs", reduce="sum")])
    assert layout["solve"][1] == {"start": 2, "stop": 3, "items": [d.to_dict() for d in c1]}
    res = InfluenceResults(torch.zeros(3, 2), torch.arange(3), torch.arange(2), torch.zeros(3), diagnostics=layout)
    assert res.per_query_diagnostics()["depth"].tolist() == [3.0, 4.0, 5.0]
    assert [(d.name, d.value) for d in res.summary_diagnostics()] == [("scale", 2.0), ("hvp_calls", 9),
                                                                      ("total_hvp_calls", 11)]


# ---------------------------------------------------------------------------------------------- W&B


def test_wandb_logs_diagnostics(tmp_path, catalogs):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    from ..lit_models import quiet_trainer
    from ..wandb_reader import wandb_offline_env
    from ..wandb_reader import OfflineRun

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

    queries = run.table("influence/queries")
    assert queries.columns[-2:] == ["relative_stderr", "depth"]
    recs = queries.records()
    assert [r["query_id"] for r in recs] == QUERY_IDS
    assert [r["relative_stderr"] for r in recs] == [0.125, None, 0.5, 0.0625, 0.25]
    assert [r["depth"] for r in recs] == DEPTH

    key = "influence/series/norm_history_table"
    assert key in out["wandb_keys"] and "influence/series/segment_change_table" in out["wandb_keys"]
    assert set(out["wandb_keys"]) <= set(run.row_with(key))
    hist = run.table(key)
    assert hist.columns == ["series", "chunk", "first_query", "last_query", "curve", "x", "y"]
    assert [tuple(r[1:]) for r in hist.rows] == [
        (0, 0, 2, "repeat 0", 50, 1.0), (0, 0, 2, "repeat 0", 100, 2.0), (0, 0, 2, "repeat 0", 150, 2.5),
        (0, 0, 2, "repeat 1", 50, 1.0), (0, 0, 2, "repeat 1", 100, 2.25), (0, 0, 2, "repeat 1", 150, 2.375),
        (1, 3, 4, "repeat 0", 50, 1.0), (1, 3, 4, "repeat 0", 100, 1.5),
        (1, 3, 4, "repeat 1", 50, 1.0), (1, 3, 4, "repeat 1", 100, 1.625),
    ]
    assert hist.rows[6][0] == "chunk 1 (queries 3–4), repeat 0"
    chart = run.config["_wandb"]["visualize"]["influence/series/norm_history"]
    assert chart["panel_config"]["fieldSettings"] == {"x": "x", "y": "y", "stroke": "series"}
    assert chart["panel_config"]["stringSettings"]["title"] == NORM_LABEL

    s = run.summary
    for name, value in EXPECTED_SCALARS.items():
        assert s[f"influence/diagnostics/{name}"] == value, name
    assert s["influence/diagnostics/preconditioner"] == "none" and s["influence/solver"] == "lissa"
    assert s["influence/diagnostic_meanings"]["norm_history"] == f"{NORM_LABEL}: {NORM_MEANING}"
    assert s["influence/diagnostic_meanings"]["total_hvp_calls"].startswith("Hessian-vector products (whole run)")
    assert "most negative self-influence" in s["influence/self_influence_meaning"]
    assert s["influence/diagnostics/scale"] == 12.5 and "influence/setup/scale" not in run.config
    row = run.row_with("influence/queries")
    assert row["influence/diagnostics/relative_stderr_max"] == 0.5 and row["influence/diagnostics/converged"] == 0.0
    assert not math.isnan(row["influence/diagnostics/total_hvp_calls"])


# ------------------------------------------------------------------------- real runs of the new solvers
@pytest.mark.parametrize("solver, labels", [
    ("ekfac", ["Kronecker layers", "mean eigenvalue of Ĥ", "Fisher labels"]),
    ("arnoldi", ["rank k", "Lanczos passes", "‖(Ĥ+λI)⁻¹ − (H+λI)⁻¹‖₂ estimate"]),
    ("lissa", ["preconditioner", "preconditioner: rank k", "scale s", "relative std. error of the scores"]),
])
def test_reports_show_each_solvers_own_diagnostics(solver, labels):
    from lightning_influence import compute_influence
    from ..problems import trained_logreg

    p = trained_logreg(n_train=200)
    res = compute_influence(p.model, p.train, p.val, query_indices=[0, 1], solver=solver, damping=p.damping,
                            dtype=torch.float64, self_influence=True)
    text = render_html(res, query_views(res, 2), suspects(res, 3), ExampleCatalog(p.train), ExampleCatalog(p.val))
    for label in labels:
        assert label in text, (solver, label)
    scalars = diagnostic_scalars(res)
    assert summary_scalars(res)["influence/damping"] == pytest.approx(p.damping)
    assert "influence/diagnostics/damping" not in scalars  # λ is logged once, as influence/damping
    if solver == "lissa":
        assert 0 < scalars["influence/diagnostics/preconditioner/rank"] <= 100
        assert "relative_stderr_median" in " ".join(scalars)
    else:
        assert not res.solve_chunks()[0].items  # a factored inverse solves nothing per query chunk
