"""The sketched compressed index (:mod:`lightning_influence.index.sketch`): the whitening coordinates give
EK-FAC's inner products to round-off, the CountSketch is the sparse matrix its buckets and signs say, the
sketched scores correlate above measured floors that rise with ``k``, the index is read back in another
process bit for bit, ``projection="auto"`` sketches only above its size limit, and a sketch asked of an
inverse without Kronecker factors is refused with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_influence import EKFACSettings, InfluenceConfigError, compute_influence
from lightning_influence.index import InfluenceIndex, build_index_for_run
from lightning_influence.index import build as index_build
from lightning_influence.index import sketch as sketch_module
from lightning_influence.index.sketch import CountSketch, KroneckerWhitening
from lightning_influence.pipeline import bind, fit_inverse, frozen_module, query_gradients
from lightning_influence.validation import check_run_arguments

from ..problems import pearson_rows, trained_logreg

QUERIES = [0, 5, 17, 33, 60]
KW = dict(damping=0.01, dtype=torch.float64, chunk_size=64)

#: mean per-query Pearson of sketched against exact-index scores (EK-FAC), on this problem (N = 160, P = 650),
#: seeds 0/1/2: k = 32: 0.603/0.619/0.611, 128: 0.865/0.885/0.878, 512: 0.968/0.957/0.961 (the Gaussian
#: whitened projection: 0.674/0.650/0.587, 0.886/0.849/0.872, 0.968/0.954/0.958); floors below the lowest seed's
SKETCH_FLOORS = {32: 0.5, 128: 0.8, 512: 0.93}


@pytest.fixture(scope="module")
def logreg():
    return trained_logreg(n_train=160)


@pytest.fixture(scope="module")
def reference(logreg):
    return compute_influence(logreg.model, logreg.train, logreg.val, query_indices=QUERIES, solver="ekfac",
                             self_influence=True, **KW)


def test_whitening_coordinates_give_the_calibrated_ekfac_inner_products():
    """``c(u)·c(v) = α uᵀ(Ĥ + λI)⁻¹ v`` to round-off (float64) on a model with a factored layer without its
    bias, one with it, a LayerNorm (the diagonal part) and, with ``dense_block_max``, the LayerNorm as a dense
    block (each group with its own calibration scale); the saved state gives the same coordinates."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    data = torch.utils.data.TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    params = ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias"]
    for settings in (EKFACSettings(), EKFACSettings(dense_block_max=64)):
        with frozen_module(model):
            problem = bind(model, data, check_run_arguments(dtype="float64", params=params))
            inverse = fit_inverse(problem, settings, 0.05)
            g = torch.randn(6, problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            expected = g @ inverse.apply(g).T
        assert bool(inverse._diag_index.numel()) != bool(inverse.blocks)  # the diagonal, or the dense block
        assert abs(inverse.scale - inverse.rest_scale) > 0.05 * inverse.scale  # two calibration scales, both used
        whitening = KroneckerWhitening.of(inverse)
        c = whitening.coordinates(g)
        assert c.shape == g.shape
        assert float((c @ c.T - expected).abs().max() / expected.abs().max()) < 1e-10
        again = KroneckerWhitening.from_state(whitening.state()).coordinates(g)
        assert torch.equal(again, c)
    with frozen_module(model):
        assert KroneckerWhitening.of(fit_inverse(problem, "exact", 5.0)) is None


def test_count_sketch_is_its_sparse_matrix_and_a_function_of_its_seed():
    sketch = CountSketch(7, 50, seed=3)
    dense = torch.zeros(7, 50, dtype=torch.float64)
    dense[sketch.buckets, torch.arange(50)] = sketch.signs.double()
    x = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sketch.apply(x), x @ dense.T, rtol=0, atol=1e-12)
    assert torch.equal(CountSketch(7, 50, seed=3).buckets, sketch.buckets)
    assert not torch.equal(CountSketch(7, 50, seed=4).buckets, sketch.buckets)
    assert set(sketch.signs.tolist()) <= {-1, 1}
    # unbiased: the mean of (S x)·(S y) over many seeds approaches x·y
    y = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    est = torch.stack([(CountSketch(7, 50, s).apply(x[:1]) @ CountSketch(7, 50, s).apply(y[None]).T).squeeze()
                       for s in range(2000)])
    assert abs(float(est.mean()) - float(x[0] @ y)) < 4 * float(est.std()) / 2000 ** 0.5


def test_sketched_index_correlates_above_floors_growing_with_size(logreg, reference, tmp_path):
    means = {}
    for k, floor in SKETCH_FLOORS.items():
        index = build_index_for_run(logreg.model, logreg.train, tmp_path / str(k), solver="ekfac",
                                    representation="compressed", projection_dim=k, projection="sketch", seed=0, **KW)
        assert index.projection == "sketch" and index.dim == k
        assert not (tmp_path / str(k) / "projection-query.bin").exists()
        res = index.explain(logreg.model, logreg.val, QUERIES)
        means[k] = float(pearson_rows(res.scores, reference.scores).mean())
        assert means[k] > floor, (k, means)
        # self-influence from the whitened coordinates: exact, not sketched
        err = (res.self_influence - reference.self_influence).abs().max() / reference.self_influence.abs().max()
        assert float(err) < 1e-10
    assert means[128] > means[32] + 0.05 and means[512] > means[128] + 0.05, means


LOAD_SCRIPT = """
import json, sys, torch
from lightning_influence.index import InfluenceIndex
index = InfluenceIndex.load(sys.argv[1])
print(json.dumps(index.scores(torch.load(sys.argv[2])).tolist()))
"""


def test_sketched_index_is_read_back_in_another_process(logreg, tmp_path):
    built = build_index_for_run(logreg.model, logreg.train, tmp_path / "index", solver="kfac",
                                representation="compressed", projection_dim=64, projection="sketch", **KW)
    with frozen_module(logreg.model):
        problem = bind(logreg.model, logreg.train, check_run_arguments(dtype="float64"))
        grads = query_gradients(problem, logreg.val, query_indices=QUERIES).grads
    here = built.scores(grads)
    assert torch.equal(InfluenceIndex.load(tmp_path / "index").scores(grads), here)
    # explain takes the queries' side from the captured layer factors, as the rows were built: same numbers
    explained = built.explain(logreg.model, logreg.val, QUERIES).scores
    assert float((explained - here).abs().max() / here.abs().max()) < 1e-10
    torch.save(grads, tmp_path / "grads.pt")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "index"), str(tmp_path / "grads.pt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.tensor(json.loads(out.stdout), dtype=torch.float64), here)


def test_auto_sketches_a_kronecker_inverse_only_and_a_sketch_needs_one(logreg, tmp_path):
    kw = dict(representation="compressed", projection_dim=16, **KW)
    assert build_index_for_run(logreg.model, logreg.train, tmp_path / "k", solver="kfac", **kw).projection == "sketch"
    exact = build_index_for_run(logreg.model, logreg.train, tmp_path / "exact", solver="exact", **kw)
    assert exact.projection == "whitened"  # no Kronecker factors: the dense matrix
    gaussian = build_index_for_run(logreg.model, logreg.train, tmp_path / "g", solver="ekfac", projection="gaussian",
                                   **kw)
    assert gaussian.projection == "whitened"
    with pytest.raises(InfluenceConfigError, match=r"projection='sketch' needs a Kronecker-factored inverse.*"
                                                   r"ExactSolver.*solver='ekfac'.*projection='gaussian'"):
        build_index_for_run(logreg.model, logreg.train, tmp_path / "bad", solver="exact", projection="sketch", **kw)
    with pytest.raises(InfluenceConfigError, match=r"projection='fast' is not one of \['auto', 'gaussian', 'sketch'\]"):
        build_index_for_run(logreg.model, logreg.train, tmp_path / "bad", projection="fast", **kw)


@pytest.mark.parametrize("block_elements", [1 << 24, 100])
def test_batch_coordinates_from_the_captured_factors_equal_those_of_the_formed_gradients(block_elements,
                                                                                          monkeypatch):
    """The build's route (layer captures of the training loss, no per-example gradient formed) against
    ``coordinates`` of autograd's per-example gradients, float64: a CNN (convolutions: positions as ``T``), and
    the LayerNorm model with its diagonal part and its dense block; whole layers, and layers in slices of the
    batch (``BLOCK_ELEMENTS = 100``)."""
    monkeypatch.setattr(sketch_module, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 16, 4)).double()
    images = torch.utils.data.TensorDataset(torch.randn(20, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (20,)))
    ln = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                             torch.nn.Linear(5, 3)).double()
    rows = torch.utils.data.TensorDataset(torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    for model, data, settings in ((cnn, images, EKFACSettings()), (ln, rows, EKFACSettings()),
                                  (ln, rows, EKFACSettings(dense_block_max=64))):
        with frozen_module(model):
            problem = bind(model, data, check_run_arguments(dtype="float64"))
            whitening = KroneckerWhitening.of(fit_inverse(problem, settings, 0.1))
            batch = next(iter(problem.train.chunks(8)))[1]
            expected = whitening.coordinates(problem.example_grads(batch))
            got = whitening.batch_coordinates(problem.objective, batch)
            sketch = CountSketch(5, problem.num_params, seed=0)
            z, norms = whitening.batch_sketch(problem.objective, batch, sketch)
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-10
        want = sketch.apply(expected)  # sketched part by part = sketched whole
        assert float((z - want).abs().max() / want.abs().max()) < 1e-10
        assert torch.allclose(norms, expected.square().sum(dim=1), rtol=1e-10, atol=0)


def test_auto_solver_takes_ekfac_for_a_compressed_index_too_large_for_the_dense_projection(logreg, tmp_path,
                                                                                             monkeypatch):
    kw = dict(representation="compressed", projection_dim=16, damping=0.01, dtype=torch.float64)
    small = build_index_for_run(logreg.model, logreg.train, tmp_path / "small", **kw)
    assert small.record.solver.get("auto_choice") != "ekfac" and small.projection != "sketch"
    monkeypatch.setattr(index_build, "DENSE_PROJECTION_BYTES", 1000)
    large = build_index_for_run(logreg.model, logreg.train, tmp_path / "large", **kw)
    assert large.record.solver["auto_choice"] == "ekfac" and large.projection == "sketch"
    assert "the sketch needs Kronecker factors" in large.record.solver["auto_reason"]
    gaussian = build_index_for_run(logreg.model, logreg.train, tmp_path / "gaussian", projection="gaussian", **kw)
    assert gaussian.projection != "sketch"  # asked for: the auto choice stands
