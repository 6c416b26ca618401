"""When the callback runs, and what it says when a run is unusual: skipped under ``fast_dev_run``, the whole
training dataset scored under ``limit_train_batches``, a warning when a resumed fit never trains (Lightning
then skips ``on_train_end``), and the cost of self-influence with the solvers that solve for it."""

from __future__ import annotations

import logging
import os
from typing import Iterator, List

import pytest
import torch

from lightning_influence import InfluenceCallback

from ..lit_models import LitClassifier, loaders, quiet_trainer
from ..problems import digits


@pytest.fixture(scope="module")
def data():
    return digits(torch.float32, n_train=400)


@pytest.fixture
def info_lines() -> Iterator[List[str]]:
    """The lines logged through Lightning's ``rank_zero_info`` (whichever namespace set its logger)."""
    import lightning_utilities.core.rank_zero as rank_zero

    lines: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = rank_zero.log, Keep(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def influence_lines(lines: List[str]) -> List[str]:
    return [line for line in lines if line.startswith("InfluenceCallback")]


def written(root) -> List[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f in ("results.pt", "report.html")]


def test_fast_dev_run_skips_with_one_line(tmp_path, data, info_lines):
    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise")
    quiet_trainer(tmp_path, callbacks=[cb], fast_dev_run=True).fit(LitClassifier(), *loaders(*data))
    assert cb.results is None and cb.error is None and written(tmp_path) == []
    assert influence_lines(info_lines) == [
        "InfluenceCallback: skipped under fast_dev_run (its checks ran before training); influence is computed at "
        "the end of a full fit."
    ]


def test_fast_dev_run_still_runs_the_checks(tmp_path, data):
    """What fast_dev_run is for: a misconfigured callback fails before training, not after a long run."""
    cb = InfluenceCallback(num_queries=2, query_indices=[10_000], on_error="raise")
    with pytest.raises(ValueError, match="query_indices .10000. are out of range"):
        quiet_trainer(tmp_path, callbacks=[cb], fast_dev_run=True).fit(LitClassifier(), *loaders(*data))


def test_limited_batches_score_the_whole_dataset_and_say_so(tmp_path, data, info_lines):
    train, val = data
    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise", params=["net.bias"])
    quiet_trainer(tmp_path, callbacks=[cb], limit_train_batches=0.3).fit(LitClassifier(), *loaders(train, val))
    assert cb.results.num_train == len(train) == 400
    assert influence_lines(info_lines) == [
        "InfluenceCallback: training used 2 of 7 batches per epoch (limit_train_batches=0.3); influence scores the "
        "whole training dataset, all 400 examples."
    ]


def test_full_batches_say_nothing(tmp_path, data, info_lines):
    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise", params=["net.bias"])
    quiet_trainer(tmp_path, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.results is not None and influence_lines(info_lines) == []


def test_resume_at_max_epochs_warns_that_nothing_was_computed(tmp_path, data):
    train, val = data
    model = LitClassifier()
    first = quiet_trainer(tmp_path / "a", max_epochs=1)
    first.fit(model, *loaders(train, val))
    ckpt = str(tmp_path / "done.ckpt")
    first.save_checkpoint(ckpt)

    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise", params=["net.bias"])
    with pytest.warns(UserWarning, match=r"InfluenceCallback computed nothing: trainer.fit ran no training because the "
                                         r"checkpoint it resumed from \(.*done.ckpt\) had already reached max_epochs=1"):
        quiet_trainer(tmp_path / "b", max_epochs=1, callbacks=[cb]).fit(LitClassifier(), *loaders(train, val),
                                                                       ckpt_path=ckpt)
    assert cb.results is None and written(tmp_path / "b") == []


def test_no_warning_after_a_normal_fit(tmp_path, data, recwarn):
    cb = InfluenceCallback(num_queries=2, solver="exact", on_error="raise", params=["net.bias"])
    quiet_trainer(tmp_path, callbacks=[cb]).fit(LitClassifier(), *loaders(*data))
    assert cb.results is not None
    assert not [w for w in recwarn if "computed nothing" in str(w.message)]


@pytest.mark.parametrize("solver, said", [("lissa", True), ("cg", True), ("arnoldi", False), ("ekfac", False),
                                          ("exact", False)])
def test_self_influence_cost_is_stated_for_solvers_that_solve_for_it(tmp_path, data, info_lines, solver, said):
    cb = InfluenceCallback(num_queries=2, solver=solver, self_influence=True)
    quiet_trainer(tmp_path, callbacks=[cb], fast_dev_run=True).fit(LitClassifier(), *loaders(*data))
    cost = [line for line in influence_lines(info_lines) if "self_influence=True" in line]
    assert bool(cost) == said
    if said:
        assert f"solver={solver!r} solves every training example's gradient" in cost[0]
        assert "A closed-form solver ('arnoldi', 'ekfac', 'kfac') computes self-influence in the scoring pass" in cost[0]


# ---------------------------------------------------------------- samplers that leave examples out (#21)
def _fit_with_sampler(tmp_path, data, sampler, **cb_kwargs):
    from torch.utils.data import DataLoader

    train, val = data
    cb = InfluenceCallback(num_queries=2, solver="exact", damping=0.1, params=["net.bias"], on_error="raise",
                           self_influence=True, **cb_kwargs)
    cb.model = LitClassifier()
    quiet_trainer(tmp_path, callbacks=[cb]).fit(cb.model, DataLoader(train, batch_size=50, sampler=sampler),
                                                DataLoader(val, batch_size=200))
    return cb


def test_a_subset_sampler_scores_only_the_examples_it_draws(tmp_path, data, info_lines):
    """Trained through SubsetRandomSampler(every 4th example): the never-trained three quarters are not scored
    (they cannot be suspects), the Hessian averages over the trained ones, and one line says so."""
    from torch.utils.data import SubsetRandomSampler

    drawn = list(range(3, 400, 4))
    cb = _fit_with_sampler(tmp_path, data, SubsetRandomSampler(drawn))
    res = cb.results
    assert res.train_indices.tolist() == drawn and res.scores.shape == (2, 100)
    assert res.settings["num_train_total"] == 100 and set(res.top_self_influence(10).indices.tolist()) <= set(drawn)
    assert set(res.top_harmful(0, k=20).indices.tolist()) <= set(drawn)
    assert ("InfluenceCallback: training draws from 100 of the 400 examples of the dataset (SubsetRandomSampler."
            "indices); influence scores only those (results.train_indices are their dataset positions).") in info_lines
    # what compute_influence gives on those examples; every one of them is scored, none of the others
    from lightning_influence import compute_influence

    alone = compute_influence(cb.model, data[0], data[1], query_indices=res.query_indices.tolist(), solver="exact",
                              damping=0.1, params=["net.bias"], train_indices=drawn)
    torch.testing.assert_close(alone.scores, res.scores)


def test_a_weighted_sampler_with_zero_weights_scores_the_weighted_examples(tmp_path, data, info_lines):
    from torch.utils.data import WeightedRandomSampler

    weights = torch.zeros(400)
    weights[:250] = 1.0
    cb = _fit_with_sampler(tmp_path, data, WeightedRandomSampler(weights, num_samples=250))
    assert cb.results.train_indices.tolist() == list(range(250))
    assert any("training draws from 250 of the 400 examples of the dataset (the nonzero weights of "
               "WeightedRandomSampler)" in line for line in info_lines)


def test_an_unknown_sampler_is_warned_about(tmp_path, data):
    from torch.utils.data import Sampler

    class Evens(Sampler):
        def __iter__(self):
            return iter(range(0, 400, 2))

        def __len__(self):
            return 200

    with pytest.warns(UserWarning, match=r"the training DataLoader draws with Evens, which may leave examples out; "
                                         r"influence scores all 400 examples.*SubsetRandomSampler\(indices\)"):
        cb = _fit_with_sampler(tmp_path, data, Evens())
    assert cb.results.scores.shape == (2, 400)
