"""The callback and compute_influence accept and refuse the same arguments, up front, with the same
messages; bad query examples are named by their dataset index."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceCallback, InfluenceConfigError, InfluenceRuntimeError, compute_influence

from .problems import digits


@pytest.fixture(scope="module")
def data():
    train, val = digits(torch.float32, n_train=100)
    return train, TensorDataset(val.tensors[0][:20], val.tensors[1][:20])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nn.Linear(64, 10)


def both(data, model, **kwargs):
    """Run the same arguments through the callback's constructor and compute_influence."""
    InfluenceCallback(**kwargs)
    return compute_influence(model, data[0], data[1], solver="exact", damping=0.1, **kwargs)


# ---------------------------------------------------------------- dtype
@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("float64", torch.float64),
                                         ("torch.float64", torch.float64), (torch.float64, torch.float64)])
def test_dtype_and_its_name_are_accepted_in_both_places(data, model, name, dtype):
    res = both(data, model, num_queries=2, dtype=name)
    assert res.scores.dtype == dtype and res.settings["dtype"] == str(dtype).replace("torch.", "")
    assert InfluenceCallback(dtype=name).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16", "bfloat16", "half"])
def test_half_precision_is_refused_in_both_places(data, model, dtype):
    match = r"is not supported: half precision keeps about 3 significant digits.*use torch.float32 \(default\) or torch.float64"
    with pytest.raises(InfluenceConfigError, match=match):
        InfluenceCallback(dtype=dtype)
    with pytest.raises(InfluenceConfigError, match=match):
        compute_influence(model, data[0], data[1], num_queries=2, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int64, "float", "double", 32])
def test_other_dtypes_are_refused(data, model, dtype):
    with pytest.raises(InfluenceConfigError, match=r"is not supported; use torch.float32 or torch.float64"):
        both(data, model, num_queries=2, dtype=dtype)


# ---------------------------------------------------------------- query_indices
@pytest.mark.parametrize("indices, match", [
    ("12", r"query_indices='12' is a string"),
    ([1.7], r"query_indices=\[1.7\] holds 1.7, which is not an integer position"),
    ([2.0], r"holds 2.0, which is not an integer position"),
    ([True, 3], r"holds True, which is not an integer position"),
    ([[1, 2], [3, 4]], r"holds a nested sequence \(2-D\)"),
    (torch.tensor([[1, 2]]), r"query_indices has shape \(1, 2\); it must be 1-D"),
    (np.array([[1], [2]]), r"query_indices has shape \(2, 1\); it must be 1-D"),
    (torch.tensor([1.0, 2.0]), r"query_indices has dtype torch.float32; positions must be integers"),
    (np.array([0.5]), r"query_indices has dtype float64; positions must be integers"),
    (torch.tensor([True]), r"has dtype torch.bool; positions must be integers"),
    (3, r"query_indices=3 is not a sequence"),
    ([], r"query_indices=\[\] is empty"),
    ([4, -1], r"must be non-negative positions \(got \[-1\]\)"),
])
def test_bad_query_indices_are_refused_up_front(data, model, indices, match):
    with pytest.raises(InfluenceConfigError, match=match):
        InfluenceCallback(query_indices=indices)
    with pytest.raises(InfluenceConfigError, match=match):
        compute_influence(model, data[0], data[1], query_indices=indices, solver="exact")


@pytest.mark.parametrize("indices", [[3, 1], (3, 1), range(3, 0, -2), torch.tensor([3, 1]),
                                     torch.tensor([3, 1], dtype=torch.int32), np.array([3, 1]),
                                     [np.int64(3), torch.tensor(1)]])
def test_integer_sequences_tensors_and_arrays_are_accepted(data, model, indices):
    res = both(data, model, query_indices=indices)
    assert res.query_indices.tolist() == [3, 1]
    assert InfluenceCallback(query_indices=indices).query_indices == [3, 1]


def test_duplicate_query_indices_warn(data, model):
    with pytest.warns(UserWarning, match=r"query_indices repeats the positions \[4\]: each repeat is solved again"):
        res = both(data, model, query_indices=[4, 2, 4])
    assert torch.equal(res.scores[0], res.scores[2])


def test_num_queries_larger_than_the_query_set_warns(data, model):
    with pytest.warns(UserWarning, match=r"num_queries=50 is larger than the query dataset \(20 examples\): all 20"):
        res = compute_influence(model, data[0], data[1], num_queries=50, solver="exact", damping=0.1)
    assert res.num_queries == 20


def test_num_queries_larger_than_the_validation_set_warns_before_training(tmp_path, data):
    import warnings

    import pytorch_lightning as pl

    from .lit_models import LitClassifier, loaders, quiet_trainer

    class Probe(pl.Callback):  # runs right after InfluenceCallback.on_train_start, before any step
        def on_train_start(self, trainer, pl_module):
            self.warned = any("num_queries=50 is larger than the query dataset (20 examples)" in str(w.message)
                              for w in caught)

    cb = InfluenceCallback(num_queries=50, solver="exact", damping=0.1, report=False, save_results=False)
    probe = Probe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, limit_train_batches=1, callbacks=[cb, probe]).fit(LitClassifier(), *loaders(*data))
    assert probe.warned and cb.results.num_queries == 20


# ---------------------------------------------------------------- bad query examples
def _with_nan(ds, i):
    x, y = ds.tensors
    x = x.clone()
    x[i, 3] = float("nan")
    return TensorDataset(x, y)


def test_nan_query_example_is_named_by_dataset_index_when_queries_are_chosen(data, model):
    with pytest.raises(InfluenceRuntimeError, match=r"the loss of query example 7 \(and 0 more\) is NaN/inf"):
        compute_influence(model, data[0], _with_nan(data[1], 7), num_queries=3, solver="exact")


def test_nan_query_example_is_named_by_dataset_index_when_queries_are_given(data, model):
    # the loss contract's check of the first queries names it, before any gradient
    with pytest.raises(InfluenceRuntimeError, match=r"NaN/inf for 1 of 2 examples .*\(the first: query example 7\)"):
        compute_influence(model, data[0], _with_nan(data[1], 7), query_indices=[1, 7], solver="exact")


def _with_label(ds, i, label):
    x, y = ds.tensors
    y = y.clone()
    y[i] = label
    return TensorDataset(x, y)


def test_ignored_query_label_warns_naming_the_example(data, model):
    with pytest.warns(UserWarning, match=r"query examples \[3\] have the label -100 .* rows of scores are all 0"):
        res = compute_influence(model, data[0], _with_label(data[1], 3, -100), query_indices=[0, 3], solver="exact",
                                damping=0.1)
    assert bool((res.scores[1] == 0).all()) and not bool((res.scores[0] == 0).all())


@pytest.mark.parametrize("where, index", [("query", 5), ("training", 60)])
def test_label_out_of_range_names_the_example(data, model, where, index):
    train, val = data
    if where == "query":
        val = _with_label(val, index, 12)
    else:
        train = _with_label(train, index, 12)
    with pytest.raises(InfluenceConfigError, match=rf"{where} example {index} has label 12, outside 0\.\.9"):
        compute_influence(model, train, val, query_indices=[0, 5], solver="exact", chunk_size=16)


def test_custom_loss_failure_names_the_examples(data, model):
    def picky(out, y):
        if bool((y > 8).any()):
            raise IndexError("label too large for my loss")
        return nn.functional.cross_entropy(out, y, reduction="none")

    train = _with_label(_with_label(data[0], 0, 0), 1, 0)  # the first examples pass the format check
    train = _with_label(train, 2, 0)
    train = _with_label(train, 3, 0)
    with pytest.raises(InfluenceRuntimeError, match=r"the loss of training examples 0\.\.15 \(dataset indices\) failed: "
                                                   r"IndexError: label too large"):
        compute_influence(model, train, data[1], num_queries=2, loss_fn=picky, solver="exact", chunk_size=16)


# ---------------------------------------------------------------- params
@pytest.mark.parametrize("params, match", [
    (123, r"params=123 is not a name or a list of names; pass parameter names, prefixes or globs"),
    ([1, 2], r"params=\[1, 2\] holds 1, which is not a string"),
    ([], r"params=\[\] is empty"),
])
def test_params_must_be_names(data, model, params, match):
    with pytest.raises(InfluenceConfigError, match=match):
        InfluenceCallback(params=params)
    with pytest.raises(InfluenceConfigError, match=match):
        compute_influence(model, data[0], data[1], num_queries=2, params=params)


# ---------------------------------------------------------------- issue #21: nothing silent
def test_a_typo_beside_a_valid_params_pattern_names_the_pattern(data, model):
    match = r"params=\['bias', 'wieght'\]: the pattern 'wieght' matches no parameter of Linear.*Fix or remove 'wieght'"
    with pytest.raises(InfluenceConfigError, match=match):
        compute_influence(model, data[0], data[1], num_queries=2, solver="exact", params=["bias", "wieght"])


def test_a_params_pattern_matching_only_frozen_parameters_is_named(data):
    net = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 10))
    net[0].requires_grad_(False)
    with pytest.raises(InfluenceConfigError, match=r"the pattern '0' matches only parameters with requires_grad=False "
                                                   r"\(0.weight, 0.bias\)"):
        compute_influence(net, data[0], data[1], num_queries=2, solver="exact", params=["0", "1"])


@pytest.mark.parametrize("flag", ["self_influence", "save_results", "report"])
@pytest.mark.parametrize("value", ["no", 0, 1, None, "False"])
def test_bool_flags_take_only_bools(flag, value):
    with pytest.raises(InfluenceConfigError, match=rf"{flag}={value!r} must be True or False"):
        InfluenceCallback(**{flag: value})


def test_self_influence_takes_only_bools_in_compute_influence(data, model):
    with pytest.raises(InfluenceConfigError, match=r"self_influence='no' must be True or False"):
        compute_influence(model, data[0], data[1], num_queries=2, self_influence="no")


def test_a_dict_as_query_indices_is_refused(data, model):
    match = r"query_indices=\{1: 'a', 3: 'b'\} is a dict, which would be read as its keys.*list\(d.values\(\)\)"
    with pytest.raises(InfluenceConfigError, match=match):
        both(data, model, query_indices={1: "a", 3: "b"})


@pytest.mark.parametrize("dtype, bad, fine", [(torch.float32, 1e39, 1e19), (torch.float32, 1e20, 1e3),
                                              (torch.float64, 1e200, 1e150)])
def test_damping_the_dtype_cannot_carry_is_refused_naming_it(data, model, dtype, bad, fine):
    kind = str(dtype).replace("torch.", "")
    fix = r"dtype=torch.float64\." if dtype == torch.float32 else r"damping='auto'\)\.$"
    with pytest.raises(InfluenceConfigError, match=rf"damping={re.escape(repr(bad))} is too large for the {kind} "
                                                   rf"computation.*{fix}"):
        InfluenceCallback(damping=bad, dtype=dtype)
    with pytest.raises(InfluenceConfigError, match=rf"too large for the {kind} computation"):
        compute_influence(model, data[0], data[1], num_queries=2, damping=bad, dtype=dtype)
    InfluenceCallback(damping=fine, dtype=dtype)  # below sqrt(finfo.max): accepted


@pytest.mark.parametrize("path", [123, 1.5, ["report.html"]])
def test_report_path_must_be_a_path(path):
    with pytest.raises(InfluenceConfigError, match=r"report_path=.* must be a file path \(str or os.PathLike\) or None"):
        InfluenceCallback(report_path=path)


@pytest.mark.parametrize("make", [lambda: __import__("lightning_influence").LissaSettings(preconditioner="foo"),
                                  lambda: __import__("lightning_influence").CGSettings(preconditioner="foo"),
                                  lambda: __import__("lightning_influence").Preconditioned(
                                      __import__("lightning_influence").CGSettings(), "foo")])
def test_an_unknown_preconditioner_is_named_as_the_preconditioner(make):
    with pytest.raises(InfluenceConfigError, match=r"(LissaSettings|CGSettings)\.preconditioner='foo' must be None or a "
                                                   r"closed-form solver \('arnoldi', 'ekfac', 'kfac'") as err:
        make()
    assert "solver='foo'" not in str(err.value)


def test_a_preconditioner_given_by_name_is_resolved():
    from lightning_influence import CGSettings, Preconditioned

    assert Preconditioned(CGSettings(), "arnoldi").by.name == "arnoldi"


def test_train_indices_are_checked_like_query_indices(data, model):
    with pytest.raises(InfluenceConfigError, match=r"train_indices repeats the positions \[3\]"):
        compute_influence(model, data[0], data[1], num_queries=2, solver="exact", train_indices=[3, 3, 5])
    with pytest.raises(InfluenceConfigError, match=r"training indices \[100\] are out of range"):
        compute_influence(model, data[0], data[1], num_queries=2, solver="exact", train_indices=[3, 100])
    res = compute_influence(model, data[0], data[1], num_queries=2, solver="exact", train_indices=[7, 3, 50])
    assert res.train_indices.tolist() == [7, 3, 50] and res.settings["num_train_total"] == 3
