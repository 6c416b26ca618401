"""The influence index against the scores it stands for: an exact index equals ``compute_influence`` (same
solver, same damping, float64) to round-off, a compressed one correlates above measured floors that rise
with the projection size; loading from disk (here and in another process) gives the same scores; other
weights, bad arguments and missing files are refused with messages that name the fix; a build sharded over
two thread ranks equals the single-process one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_influence import InfluenceConfigError, InfluenceResults, ResultsFileError, compute_influence
from lightning_influence.index import IndexMismatchError, InfluenceIndex, build_index, build_index_for_run
from lightning_influence.pipeline import bind, fit_inverse, frozen_module
from lightning_influence.scoring import top_k
from lightning_influence.validation import check_run_arguments

from ..problems import pearson_rows, trained_logreg
from ..threads import run_ranks

QUERIES = [0, 5, 17, 33, 60]
DAMPING = 0.01
KW = dict(damping=DAMPING, dtype=torch.float64, chunk_size=64)


@pytest.fixture(scope="module")
def logreg():
    return trained_logreg(n_train=160)


@pytest.fixture(scope="module")
def references(logreg):
    """``compute_influence`` scores per solver (with self-influence where it is cheap), computed once."""
    return {s: compute_influence(logreg.model, logreg.train, logreg.val, query_indices=QUERIES, solver=s,
                                 self_influence=s != "cg", **KW) for s in ("exact", "ekfac", "cg")}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("solver", ["exact", "ekfac"])
def test_exact_index_equals_compute_influence(logreg, references, solver, tmp_path):
    ref = references[solver]
    index = build_index_for_run(logreg.model, logreg.train, tmp_path, solver=solver, **KW)
    res = index.explain(logreg.model, logreg.val, QUERIES)
    assert res.scores.shape == ref.scores.shape == (len(QUERIES), len(logreg.train))
    assert relative_error(res.scores, ref.scores) < 1e-10
    assert torch.equal(res.query_indices, ref.query_indices) and torch.equal(res.train_indices, ref.train_indices)
    assert torch.allclose(res.query_losses, ref.query_losses, rtol=1e-12, atol=0)
    assert torch.equal(res.query_targets, ref.query_targets)
    assert relative_error(res.self_influence, ref.self_influence) < 1e-10
    assert res.settings["solver"] == solver and res.damping == DAMPING and res.settings["num_queries"] == len(QUERIES)
    # top-k streamed over the stored rows = top-k of the full reference rows
    from lightning_influence.pipeline import query_gradients

    with frozen_module(logreg.model):
        problem = bind(logreg.model, logreg.train, check_run_arguments(chunk_size=64, dtype="float64"))
        grads = query_gradients(problem, logreg.val, query_indices=QUERIES).grads
    for largest in (True, False):
        positions, values = index.top_k(grads, k=10, largest=largest)
        for q in range(len(QUERIES)):
            want, want_values = top_k(ref.scores[q], 10, largest=largest)
            assert positions[q].tolist() == want.tolist()
            assert torch.allclose(values[q], want_values, rtol=1e-10, atol=0)
    assert res.top_harmful(0, k=5).indices.tolist() == ref.top_harmful(0, k=5).indices.tolist()


def test_exact_index_of_an_iterative_solver_equals_compute_influence_to_its_tolerance(logreg, references, tmp_path):
    ref = references["cg"]  # CG stops at a relative residual of 1e-6 (default tol): queries here, training rows there
    index = build_index_for_run(logreg.model, logreg.train, tmp_path, solver="cg", **KW)
    res = index.explain(logreg.model, logreg.val, QUERIES)
    assert relative_error(res.scores, ref.scores) < 1e-5
    assert relative_error(res.scores, references["exact"].scores) < 1e-5


#: mean per-query Pearson of compressed against exact-index scores (EK-FAC, whitened projection), measured on
#: this problem (N = 160, P = 650, seed 0): k = 32: 0.674, 128: 0.886, 512: 0.968 (seeds 1, 2: 0.650/0.587,
#: 0.849/0.872, 0.954/0.958); floors set below the lowest seed's
COMPRESSED_FLOORS = {32: 0.55, 128: 0.8, 512: 0.93}


def test_compressed_index_correlates_above_floors_growing_with_size(logreg, references, tmp_path):
    ref = references["ekfac"].scores
    means = {}
    for k, floor in COMPRESSED_FLOORS.items():
        index = build_index_for_run(logreg.model, logreg.train, tmp_path / str(k), solver="ekfac",
                                    representation="compressed", projection_dim=k, seed=0, projection="gaussian",
                                    **KW)
        assert index.dim == k and index.meta["projection"]["kind"] == "whitened"
        res = index.explain(logreg.model, logreg.val, QUERIES)
        means[k] = float(pearson_rows(res.scores, ref).mean())
        assert means[k] > floor, (k, means)
        # a factored inverse gives self-influence in the same pass: exact, not projected
        assert relative_error(res.self_influence, references["ekfac"].self_influence) < 1e-10
    assert means[128] > means[32] + 0.05 and means[512] > means[128] + 0.05, means


def test_compressed_index_is_a_function_of_its_seed(logreg, tmp_path):
    a = build_index_for_run(logreg.model, logreg.train, tmp_path / "a", solver="exact", representation="compressed",
                            projection_dim=48, seed=3, **KW)
    b = build_index_for_run(logreg.model, logreg.train, tmp_path / "b", solver="exact", representation="compressed",
                            projection_dim=48, seed=3, chunk_size=32, damping=DAMPING, dtype=torch.float64)
    c = build_index_for_run(logreg.model, logreg.train, tmp_path / "c", solver="exact", representation="compressed",
                            projection_dim=48, seed=4, **KW)
    sa, sb, sc = (i.explain(logreg.model, logreg.val, QUERIES).scores for i in (a, b, c))
    assert relative_error(sb, sa) < 1e-10  # another chunk size: the same projection
    assert relative_error(sc, sa) > 1e-3  # another seed: another projection


LOAD_SCRIPT = """
import json, sys, torch
from lightning_influence.index import InfluenceIndex
index = InfluenceIndex.load(sys.argv[1])
grads = torch.load(sys.argv[2])
print(json.dumps(index.scores(grads).tolist()))
"""


def test_loaded_index_gives_identical_scores_here_and_in_another_process(logreg, tmp_path):
    from lightning_influence.pipeline import query_gradients

    built = build_index_for_run(logreg.model, logreg.train, tmp_path / "index", solver="ekfac",
                                representation="compressed", projection_dim=64, **KW)
    with frozen_module(logreg.model):
        problem = bind(logreg.model, logreg.train, check_run_arguments(dtype="float64"))
        grads = query_gradients(problem, logreg.val, query_indices=QUERIES).grads
    here = built.scores(grads)
    loaded = InfluenceIndex.load(str(tmp_path / "index"))
    assert torch.equal(loaded.scores(grads, module=logreg.model), here)
    torch.save(grads, tmp_path / "grads.pt")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "index"), str(tmp_path / "grads.pt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.tensor(json.loads(out.stdout), dtype=torch.float64), here)


def test_other_weights_are_refused_naming_the_parameter_and_the_fix(logreg, tmp_path):
    index = build_index_for_run(logreg.model, logreg.train, tmp_path, solver="exact", **KW)
    other = copy.deepcopy(logreg.model)
    with torch.no_grad():
        other.bias[3] += 1e-9
    mismatch = r"built for other weights: parameter\(s\) \['bias'\].*Rebuild the index"
    with pytest.raises(IndexMismatchError, match=mismatch):
        index.explain(other, logreg.val, QUERIES)
    with pytest.raises(InfluenceConfigError, match=r"\['bias'\]"):
        InfluenceIndex.load(tmp_path).scores(torch.zeros(2, index.num_params, dtype=torch.float64), module=other)
    with pytest.raises(IndexMismatchError, match=r"built with the loss 'default_loss_fn'.*rebuild"):
        index.explain(logreg.model, logreg.val, QUERIES,
                      loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"))
    index.check_module(copy.deepcopy(logreg.model))  # the same weights in another module object pass


def test_bad_arguments_name_the_argument_and_the_fix(logreg, tmp_path):
    with pytest.raises(InfluenceConfigError, match=r"representation='fast' is not one of \['exact', 'compressed'\]"):
        build_index_for_run(logreg.model, logreg.train, tmp_path, representation="fast")
    for bad in (0, -3, 2.5):
        with pytest.raises(InfluenceConfigError, match=rf"projection_dim={bad!r} must be a positive integer"):
            build_index_for_run(logreg.model, logreg.train, tmp_path, representation="compressed", projection_dim=bad)
    with pytest.raises(InfluenceConfigError, match=r"path=.*nowhere.* does not exist.*build_index"):
        InfluenceIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfluenceConfigError, match=r"holds no index.json"):
        InfluenceIndex.load(tmp_path / "empty")
    index = build_index_for_run(logreg.model, logreg.train, tmp_path / "ok", solver="exact", **KW)
    with pytest.raises(InfluenceConfigError, match=r"query_grads must be a \[Q, 650\] tensor"):
        index.scores(torch.zeros(2, 649, dtype=torch.float64))
    with pytest.raises(InfluenceConfigError, match=r"k=0 must be a positive integer"):
        index.top_k(torch.zeros(2, 650, dtype=torch.float64), k=0)
    os.unlink(tmp_path / "ok" / "rows-0.bin")
    with pytest.raises(ResultsFileError, match=r"rows-0.bin is missing from the index folder.*Rebuild"):
        InfluenceIndex.load(tmp_path / "ok")


@pytest.mark.parametrize("solver,representation,projection", [
    ("exact", "exact", "auto"), ("exact", "compressed", "auto"), ("ekfac", "compressed", "sketch"),
    ("cg", "exact", "auto")])
def test_a_build_sharded_over_two_thread_ranks_equals_the_single_process_one(logreg, tmp_path, monkeypatch, solver,
                                                                              representation, projection):
    kw = dict(solver=solver, representation=representation, projection_dim=40, projection=projection, **KW)
    single = build_index_for_run(logreg.model, logreg.train, tmp_path / "one", **kw)

    def rank(r, comm):
        build_index_for_run(copy.deepcopy(logreg.model), logreg.train, tmp_path / "two", comm=comm, **kw)
        return r

    assert run_ranks(2, rank, monkeypatch) == [0, 1]
    two = InfluenceIndex.load(tmp_path / "two")
    assert [(s["start"], s["stop"]) for s in two.meta["shards"]] == [(0, 80), (80, 160)]
    assert two.record.data.processes == 2
    grads = torch.randn(3, two.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = single.scores(grads), two.scores(grads)
    # sums over the shards in another order: the Hessian to round-off (exact); CG to its tolerance
    tol = 1e-5 if solver == "cg" else 1e-10
    assert relative_error(b, a) < tol
    assert relative_error(two.self_influence, single.self_influence) < tol


def test_build_index_from_the_phases(logreg, references, tmp_path):
    """The low-level entry point: a problem and a fitted inverse from the public phases."""
    with frozen_module(logreg.model):
        problem = bind(logreg.model, logreg.train, check_run_arguments(chunk_size=50, dtype="float64"))
        inverse = fit_inverse(problem, "exact", DAMPING)
        done = []
        index = build_index(problem, inverse, tmp_path, progress=lambda d, t: done.append((d, t)))
    assert done[-1] == (160, 160) and len(done) == 4
    assert index.solver == "ExactSolver" and index.disk_bytes >= 160 * 650 * 8
    res = index.explain(logreg.model, logreg.val, QUERIES)
    assert relative_error(res.scores, references["exact"].scores) < 1e-10
    res.save(tmp_path / "results.pt")  # the report format of compute_influence: saved and read back whole
    back = InfluenceResults.load(tmp_path / "results.pt")
    assert torch.equal(back.scores, res.scores) and back.settings["num_queries"] == len(QUERIES)
