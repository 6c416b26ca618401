"""The model zoo (tests/zoo.py): every entry builds deterministically, fits its data, has the documented size,
a per-example loss and a damping that makes its Hessian positive definite. Two builds per entry: ≈ 21 s on an
idle core (about twice that while other jobs share the two cores)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from . import zoo

# exact parameter counts (architecture, not training) and what each entry reached when it was measured
# (torch 2.13, 1 thread): train loss / train accuracy / query accuracy, thresholds with a margin below.
PARAMS = {
    "logreg_digits": 650, "mlp_tanh_digits": 1810, "cnn_bn_digits": 1946, "resnet_block_digits": 1602,
    "transformer_tokens": 2595, "lstm_tokens": 3843, "gru_tokens_seqfirst": 2931, "rnn_tokens": 1082,
    "embedding_bag_text": 1668, "causal_lm_grammar": 2648, "regression_mlp": 1313,
}
# name: (max mean train loss, min train accuracy, min query accuracy); measured 0.386/0.96/0.98, 0.196/0.99/0.92,
# 0.004/1/0.90, 0.006/1/0.96, 0.023/1/0.925, 0.044/1/0.975, 0.031/1/1, 0.008/1/1, 0.24/1/1
CLASSIFIERS = {
    "logreg_digits": (0.5, 0.9, 0.85),
    "mlp_tanh_digits": (0.3, 0.95, 0.8),
    "cnn_bn_digits": (0.05, 0.98, 0.8),
    "resnet_block_digits": (0.05, 0.98, 0.8),
    "transformer_tokens": (0.1, 0.98, 0.8),
    "lstm_tokens": (0.15, 0.98, 0.85),
    "gru_tokens_seqfirst": (0.15, 0.98, 0.85),
    "rnn_tokens": (0.05, 0.98, 0.85),
    "embedding_bag_text": (0.35, 0.98, 0.9),
}


def _tensors(entry):
    return [t for t in entry.model.state_dict().values()] + list(entry.train.tensors) + list(entry.query.tensors)


def test_registry():
    assert set(zoo.NAMES) == set(PARAMS) == set(zoo.ZOO)
    assert len(zoo.NAMES) == len({zoo.get(n).family for n in zoo.NAMES})  # one entry per family
    with pytest.raises(KeyError, match="no zoo entry"):
        zoo.get("nope")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_deterministic(name):
    """A fresh build and the cached one (built separately) are bit-identical: weights, buffers and data;
    building leaves the caller's RNG where it was."""
    state = torch.get_rng_state()
    fresh = zoo.ZOO[name]()
    assert torch.equal(torch.get_rng_state(), state)
    cached = zoo.get(name)
    assert fresh is not cached
    a, b = _tensors(fresh), _tensors(cached)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_size_mode_and_data(name):
    e = zoo.get(name)
    assert e.name == name
    assert e.num_params == sum(p.numel() for p in e.model.parameters()) == PARAMS[name]
    lo, hi = zoo.PARAM_RANGE
    assert lo <= e.num_params <= hi
    assert 100 <= len(e.train) <= 400 and 20 <= len(e.query) <= 60
    assert not any(m.training for m in e.model.modules())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in e.model.parameters())
    assert e.weight_decay > 0
    x, y = e.train.tensors
    xq, yq = e.query.tensors
    assert x.shape[0] == y.shape[0] == len(e.train) and x.shape[1:] == xq.shape[1:] and y.shape[1:] == yq.shape[1:]


@pytest.mark.parametrize("name", zoo.NAMES)
def test_loss_fn_per_example(name):
    """``loss_fn`` (or the default cross-entropy when ``None``) gives one finite loss per example; its mean
    over the training set is the recorded training loss."""
    e = zoo.get(name)
    x, y = e.train.tensors
    with torch.no_grad():
        out = e.model(x[:7])
        per = e.per_example_loss(out, y[:7])
        assert per.shape == (7,) and torch.isfinite(per).all() and (per >= 0).all()
        if e.loss_fn is None:
            assert out.ndim == 2 and out.shape[0] == 7 and y.dtype == torch.long
            torch.testing.assert_close(per, F.cross_entropy(out, y[:7], reduction="none"))
        else:
            assert e.loss_fn(out, y[:7]).shape == (7,)
        one = e.per_example_loss(e.model(x[:1]), y[:1])
        assert one.shape == (1,)
        torch.testing.assert_close(one, per[:1], rtol=1e-4, atol=1e-5)
        mean = e.per_example_loss(e.model(x), y).mean()
    assert abs(float(mean) - e.info["train_loss"]) <= 1e-4 * max(1.0, e.info["train_loss"])


def test_language_model_loss():
    """The causal LM: logits ``[B, T, V]``, targets ``[B, T]`` (the inputs shifted by one), loss per sequence =
    sum of the token cross-entropies; the causal mask keeps position t's logits independent of later tokens;
    the fit is near the grammar's entropy rate."""
    e = zoo.get("causal_lm_grammar")
    x, y = e.train.tensors
    assert e.task == "language_model" and x.dtype == y.dtype == torch.long and x.shape == y.shape
    assert torch.equal(x[:, 1:], y[:, :-1])
    with torch.no_grad():
        logits = e.model(x[:5])
        assert logits.shape == (5, x.shape[1], 8)
        tok = F.cross_entropy(logits.reshape(-1, 8), y[:5].reshape(-1), reduction="none").view(5, -1)
        torch.testing.assert_close(e.loss_fn(logits, y[:5]), tok.sum(1))
        changed = x[:5].clone()
        changed[:, -1] = (changed[:, -1] + 1) % 8
        torch.testing.assert_close(e.model(changed)[:, :-1], logits[:, :-1], rtol=1e-4, atol=1e-5)
    # measured: 0.709 nats/token (train), 0.852 (query), entropy rate 0.727; token accuracy 0.754 / 0.738
    i, t = e.info, x.shape[1]
    assert abs(i["train_token_loss"] - i["entropy_rate"]) < 0.1 and i["query_loss"] / t < i["entropy_rate"] + 0.3
    assert i["train_token_acc"] > 0.65 and i["query_token_acc"] > 0.6


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifiers_fit(name):
    max_loss, min_acc, min_query_acc = CLASSIFIERS[name]
    e = zoo.get(name)
    i = e.info
    assert e.task == "classification" and e.loss_fn is None
    assert i["train_loss"] < max_loss, i
    assert i["train_acc"] >= min_acc and i["query_acc"] >= min_query_acc, i
    assert i["query_acc"] > i["chance_acc"] + 0.4


def test_regression_fit():
    e = zoo.get("regression_mlp")
    i = e.info  # measured: train MSE 0.037, query 0.053, target variance 1.54
    assert e.task == "regression" and e.train.tensors[1].shape[1:] == (1,)
    assert i["train_loss"] < 0.1 * i["target_var"] and i["query_loss"] < 0.2 * i["target_var"], i


def test_near_stationary():
    """Trained to near a stationary point of mean loss + wd/2·‖θ‖²: the recorded gradient norm (measured
    5e-5 to 0.06)."""
    for name in zoo.NAMES:
        e = zoo.get(name)
        assert e.info["grad_norm"] < 0.3, (name, e.info["grad_norm"])


@pytest.mark.parametrize("name", zoo.NAMES)
def test_damping_makes_hessian_positive_definite(name):
    """``H + damping·I`` is positive definite with a margin (``λmin(H) + damping ≥ damping/4``; Lanczos,
    40 steps, 25 for the ResNet whose HVPs cost most and whose λmin converges by then) and
    ``damping ≥ weight_decay``."""
    e = zoo.get(name)
    lam_min, lam_max = zoo.hessian_extremes(e, steps=25 if name == "resnet_block_digits" else 40)
    assert e.damping >= e.weight_decay
    assert lam_min + e.damping >= 0.25 * e.damping, (lam_min, e.damping)
    assert lam_max > 0


@pytest.mark.parametrize("name", ["logreg_digits", "cnn_bn_digits", "lstm_tokens", "causal_lm_grammar"])
def test_float64_copy(name):
    """``get(name, torch.float64)``: a cached float64 copy of the same weights and data; the float32 entry is
    untouched and outputs agree to float32 precision."""
    e32, e64 = zoo.get(name), zoo.get(name, torch.float64)
    assert zoo.get(name, torch.float64) is e64 and e32.double().model is not e32.model
    for (n32, p32), (n64, p64) in zip(e32.model.state_dict().items(), e64.model.state_dict().items()):
        assert n32 == n64
        assert torch.equal(p64, p32.double()) if p32.is_floating_point() else torch.equal(p64, p32)
    assert all(p.dtype == torch.float32 for p in e32.model.parameters())
    x32, x64 = e32.train.tensors[0][:16], e64.train.tensors[0][:16]
    assert x64.dtype == (torch.float64 if x32.is_floating_point() else x32.dtype)
    with torch.no_grad():
        torch.testing.assert_close(e64.model(x64).float(), e32.model(x32), rtol=1e-3, atol=1e-4)
