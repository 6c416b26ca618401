"""The callback's ``build_index=``: the index built when training ends under the run's solver and damping,
``cb.explain`` answering new queries from it (the run's own queries: the run's scores), weights changed after
training refused, a failed build contained as an output failure."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_influence import InfluenceCallback, InfluenceConfigError
from lightning_influence.index import IndexMismatchError

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits, pearson_rows


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=200)


def fit(tmp_path, data, **kw):
    torch.manual_seed(0)
    cb = InfluenceCallback(num_queries=4, solver="exact", params=["net"], on_error="raise", report=False, **kw)
    model = LitClassifier()
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, *loaders(*data))
    return cb, model


def test_explain_answers_the_runs_queries_with_the_runs_scores(tmp_path, data):
    cb, model = fit(tmp_path, data, build_index=True, dtype=torch.float64)  # float64: equal to round-off
    assert cb.index is not None and cb.index.representation == "exact"
    assert os.path.isdir(os.path.join(tmp_path, "lightning_logs", "version_0", "influence", "index"))
    res = cb.explain(data[1], cb.results.query_indices.tolist())
    torch.testing.assert_close(res.scores, cb.results.scores, rtol=1e-9, atol=1e-11)
    assert res.damping == pytest.approx(cb.results.damping)
    with torch.no_grad():
        model.net.bias.add_(0.1)  # the weights move on after training: the index no longer describes them
    with pytest.raises(IndexMismatchError, match="net.bias"):
        cb.explain(data[1], [0, 1])


def test_a_compressed_index_from_the_callback(tmp_path, data):
    cb, _ = fit(tmp_path, data, build_index="compressed", index_projection_dim=512)
    assert cb.index.representation == "compressed" and cb.index.projection_dim == 512
    res = cb.explain(data[1], cb.results.query_indices.tolist())
    r = pearson_rows(res.scores, cb.results.scores)
    assert float(r.min()) > 0.8, r  # 650 parameters whitened and projected to 512


def test_explain_without_an_index_and_bad_arguments_say_what_to_pass(tmp_path, data):
    cb, _ = fit(tmp_path, data)
    with pytest.raises(InfluenceConfigError, match="pass build_index=True"):
        cb.explain(data[1], [0])
    with pytest.raises(InfluenceConfigError, match="build_index='yes' must be True, False, 'exact' or 'compressed'"):
        InfluenceCallback(build_index="yes")
    with pytest.raises(InfluenceConfigError, match="index_projection_dim=0 must be a positive integer"):
        InfluenceCallback(build_index="compressed", index_projection_dim=0)


def test_a_failed_build_keeps_the_run(tmp_path, data, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lightning_influence.integration.writer.build_index_for_run", broken)
    torch.manual_seed(0)
    cb = InfluenceCallback(num_queries=4, solver="exact", params=["net"], report=False, build_index=True)
    with pytest.warns(UserWarning, match="could not write the influence index"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.results is not None and cb.index is None and cb.results_path and os.path.exists(cb.results_path)
    assert isinstance(cb.output_errors["influence index"], OSError)
