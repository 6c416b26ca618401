"""Smoke tests of benchmark scripts: their pure-ours path runs end to end at a tiny size and prints sane numbers.

``benchmarks/bench_transformers.py --size tiny --no-peers --inline``: both transformers (classifier with planted
label flips, causal LM) built and trained, our CG reference and EK-FAC in this process, kronfluence skipped (it is
a peer, not a dependency). The table must hold a row per method with EK-FAC correlated with the reference and a
Kronecker coverage in (0, 1]."""

from __future__ import annotations

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def bench_transformers():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_transformers as mod
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return mod


def test_bench_transformers_tiny_ours_only(bench_transformers, tmp_path, monkeypatch):
    mod = bench_transformers
    tiny = {"classifier": dict(mod.SIZES["tiny"]["classifier"], n_train=60, queries=3),
            "lm": dict(mod.SIZES["tiny"]["lm"], n_train=50, queries=3)}
    monkeypatch.setitem(mod.SIZES, "tiny", tiny)
    out = tmp_path / "t.md"
    assert mod.main(["--size", "tiny", "--no-peers", "--inline", "--ours", "ekfac", "--tol", "1e-4", "--damping", "5", "--plain-cg",
                     "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "kronfluence skipped" in text
    for model in ("classifier", "lm"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {model} (")]
        assert len(rows) == 2, text  # the CG reference and ours `ekfac`
        assert "reference: ours `cg`" in rows[0]
        assert re.search(r"\*\*λ = [0-9.e+-]+\*\*", text)
        cols = [c.strip() for c in rows[1].strip("|").split("|")]
        assert cols[1] == "ours `ekfac`", rows[1]
        r_med, r_min, ratio, coverage = (float(c) for c in cols[2:6])
        assert r_med > 0.3 and r_min <= r_med, rows[1]
        assert 0 < coverage <= 1, rows[1]
        assert ratio > 0, rows[1]
        if model == "classifier":
            found, baseline = re.match(r"(\d+) / (\d+) of (\d+)", cols[6]).groups()[:2]
            assert 0 <= int(found) and 0 <= int(baseline)


def test_the_peer_adapters_differentiate_the_zoo_entrys_loss():
    """``benchmarks/peers.py``: ``use_loss`` sets the per-example loss every adapter uses, and the targets drawn
    for kronfluence's true Fisher have the shape and law of the task (a label per row, a token per position,
    Gaussian noise of variance ½ around the prediction for the summed squared error)."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    from tests.zoo import lm_sequence_loss, mse_loss

    torch.manual_seed(0)
    try:
        logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
        peers.use_loss(None)
        torch.testing.assert_close(peers._mean_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
        assert peers._sampled_targets(logits, labels).shape == (6,)
        lm, tokens = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
        peers.use_loss(lm_sequence_loss, "language_model")
        torch.testing.assert_close(peers._PerExampleLoss()(lm, tokens), lm_sequence_loss(lm, tokens))
        drawn = peers._sampled_targets(lm, tokens)
        assert drawn.shape == (3, 5) and drawn.dtype == torch.long and int(drawn.max()) < 7
        out = torch.zeros(20000, 1)
        peers.use_loss(mse_loss, "regression")
        noise = peers._sampled_targets(out, out)
        assert abs(float(noise.var()) - 0.5) < 0.03 and abs(float(noise.mean())) < 0.03
    finally:
        peers.use_loss(None)
