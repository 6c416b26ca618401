"""Differentiation strategies (lightning_influence.autodiff) on a zoo of tiny seeded models whose kernels lack
forward-mode, double-backward or vmap support: every strategy that runs gives the exact numbers, and the
probe picks one that works and says why the others were rejected."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_influence import InfluenceConfigError
from lightning_influence import autodiff as ad
from lightning_influence.functional import ParamSpace

from .custom_ops import BrokenBackward, CustomNet, DetachedBackward, NoBackward, OldStyle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB, WIDTH, CLASSES, STEPS = 9, 4, 3, 4


class TokenClassifier(nn.Module):
    """Token ids ``[B, T]`` → logits ``[B, 3]`` through one body: ``mlp`` (mean of embeddings, tanh layer),
    ``tf`` (one TransformerEncoder layer), ``lstm``/``gru``/``rnn`` (last state), ``bag`` (EmbeddingBag)."""

    def __init__(self, kind: str, batch_first: bool = True) -> None:
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.emb = nn.EmbeddingBag(VOCAB, WIDTH, mode="mean") if kind == "bag" else nn.Embedding(VOCAB, WIDTH)
        if kind == "tf":
            layer = nn.TransformerEncoderLayer(WIDTH, 2, 8, dropout=0.0, batch_first=True)
            self.body: nn.Module = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        elif kind in ("lstm", "gru", "rnn"):
            self.body = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](WIDTH, WIDTH, batch_first=batch_first)
        else:
            self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "bag":
            return self.head(self.emb(x))
        h = self.emb(x)
        if self.kind in ("tf", "mlp"):
            return self.head(self.body(h).mean(1))
        out, _ = self.body(h if self.batch_first else h.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


@dataclass
class Problem:
    model: nn.Module
    loss: Callable[[Dict[str, Tensor], Any], Tensor]
    space: ParamSpace
    theta: Tensor
    batch: Tuple[Tensor, Tensor]


def make(kind: str, dtype: torch.dtype = torch.float64, batch_first: bool = True, n: int = 4, seed: int = 0,
         model: nn.Module = None) -> Problem:
    torch.manual_seed(seed)
    model = (model if model is not None else TokenClassifier(kind, batch_first)).to(dtype).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    space = ParamSpace.from_params(params)
    x = torch.randint(0, VOCAB, (n, STEPS)) if kind != "dense" else torch.randn(n, 3, dtype=dtype)
    y = torch.randint(0, CLASSES if kind != "dense" else 2, (n,))

    def loss(p: Dict[str, Tensor], b: Any) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (b[0],)), b[1], reduction="none")

    return Problem(model, loss, space, space.flatten(params), (x, y))


ZOO = [("mlp", True), ("tf", True), ("lstm", True), ("lstm", False), ("gru", True), ("gru", False), ("rnn", True),
       ("rnn", False), ("bag", True)]
ZOO_IDS = [f"{k}-{'bf' if bf else 'tf'}" for k, bf in ZOO]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def eager_hvp(pb: Problem, vectors: Tensor) -> Tensor:
    """Reference: double backward with eager autograd, composite kernels (no torch.func)."""
    rows = []
    with ad.composite_kernels():
        for v in vectors:
            t = pb.theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(pb.loss(pb.space.unflatten(t), pb.batch).mean(), t, create_graph=True)
            rows.append(torch.autograd.grad(g @ v, t)[0])
    return torch.stack(rows)


def loop_grads(pb: Problem) -> Tensor:
    """Reference: one eager backward per example."""
    rows = []
    for i in range(pb.batch[0].shape[0]):
        t = pb.theta.clone().requires_grad_(True)
        example = (pb.batch[0][i : i + 1], pb.batch[1][i : i + 1])
        rows.append(torch.autograd.grad(pb.loss(pb.space.unflatten(t), example).sum(), t)[0])
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- composite kernels

BAG_LAYOUTS = {  # input, offsets, include_last_offset
    "2d": (torch.tensor([[1, 2, 2, 5], [2, 2, 2, 2], [0, 8, 3, 2]]), None, False),
    "1d": (torch.tensor([1, 2, 5, 2, 7, 0, 3, 8, 2]), torch.tensor([0, 2, 2, 7]), False),  # an empty bag
    "1d-last": (torch.tensor([1, 2, 5, 2, 7, 0, 3, 8, 2]), torch.tensor([0, 3, 3, 6, 9]), True),
}


@pytest.mark.parametrize("mode, padding_idx, weighted, layout", [
    (m, p, w, lay)
    for m, p, w, lay in itertools.product(["sum", "mean", "max"], [None, 2, -7], [False, True], BAG_LAYOUTS)
    if not (w and m != "sum")
])
def test_composite_embedding_bag_matches_native(mode, padding_idx, weighted, layout):
    gen = torch.Generator().manual_seed(0)
    inp, offsets, last = BAG_LAYOUTS[layout]
    weight = torch.randn(VOCAB, 3, generator=gen, dtype=torch.float64)
    psw = torch.randn(inp.shape, generator=gen, dtype=torch.float64) if weighted else None
    outs, grads = [], []
    for fn in (F.embedding_bag, ad.composite_embedding_bag):
        w = weight.clone().requires_grad_(True)
        s = psw.clone().requires_grad_(True) if weighted else None
        out = fn(inp, w, offsets, mode=mode, per_sample_weights=s, include_last_offset=last, padding_idx=padding_idx)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads.append(torch.autograd.grad((out * cot).sum(), [w] + ([s] if weighted else [])))
        outs.append(out.detach())
    assert outs[0].shape == outs[1].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for native, composite in zip(*grads):
        torch.testing.assert_close(composite, native, rtol=1e-12, atol=1e-12)


def test_composite_kernels_substitutes_embedding_bag_and_restores_flags():
    pb = make("bag")
    def flags():
        return torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled, torch.backends.mha.get_fastpath_enabled()

    before = flags()
    v = torch.randn(2, pb.space.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="_embedding_bag"):  # the native op has no forward-mode derivative
        ad.batch_hvp(ad.Differentiation(), pb.loss, pb.space, pb.theta, pb.batch, v)
    with pytest.raises(RuntimeError, match="boom"):
        with ad.composite_kernels():
            assert flags() == (False, False, False)
            hv = ad.batch_hvp(ad.Differentiation(), pb.loss, pb.space, pb.theta, pb.batch, v)  # jvp(grad) under vmap
            raise RuntimeError("boom")
    assert flags() == before
    assert rel(hv, eager_hvp(pb, v)) < 1e-12


def test_overlapping_composite_blocks_in_two_threads_restore_the_flags():
    """Thread A enters, B enters, A leaves, B leaves (as two in-process ranks do): with a save and restore
    per block B restored A's 'off' and mkldnn stayed off for the rest of the process (which turned later
    float32 LSTM and transformer probes into other plans in the full suite). The flags are off while any
    block is open and restored when the last one closes."""
    import threading

    def flags():
        return torch.backends.mkldnn.enabled, torch.backends.mha.get_fastpath_enabled()

    before = flags()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with ad.composite_kernels(embedding_bag=False):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with ad.composite_kernels(embedding_bag=False):
            b_in.set()
            a_out.wait(5)
            seen["after a left"] = flags()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["after a left"] == (False, False)
    assert flags() == before


# ---------------------------------------------------------------------------------------------------- HVPs

def test_exact_hvps_equal_the_dense_hessian_and_each_other():
    """(a) and (b): on the MLP every exact strategy, plain and composite, applied to the identity gives the dense
    Hessian (torch.autograd.functional.hessian), and reverse over reverse equals forward over reverse."""
    pb = make("mlp")
    f = lambda t: pb.loss(pb.space.unflatten(t), pb.batch).mean()  # noqa: E731
    dense = torch.autograd.functional.hessian(f, pb.theta)
    eye = torch.eye(pb.space.num_params, dtype=torch.float64)
    out = {}
    for hvp, composite in itertools.product(("forward_over_reverse", "reverse_over_reverse"), (False, True)):
        plan = ad.Differentiation(hvp=hvp, hvp_composite=composite)
        out[(hvp, composite)] = ad.batch_hvp(plan, pb.loss, pb.space, pb.theta, pb.batch, eye, chunk_size=32)
        assert rel(out[(hvp, composite)], dense) < 1e-13
    assert rel(out[("reverse_over_reverse", False)], out[("forward_over_reverse", False)]) < 1e-14


@pytest.fixture(scope="module")
def probed() -> Dict[Tuple[str, bool], Tuple[Problem, ad.Differentiation, ad.ProbeReport]]:
    out = {}
    for kind, bf in ZOO:
        pb = make(kind, batch_first=bf)
        plan, report = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, timing_examples=8, timing_vectors=4)
        out[(kind, bf)] = (pb, plan, report)
    return out


@pytest.mark.parametrize("kind, bf", ZOO, ids=ZOO_IDS)
def test_probed_plan_hvps_equal_double_backward(probed, kind, bf):
    """(a) on every zoo model: the chosen plan's HVPs equal eager double backward in composite mode."""
    pb, plan, report = probed[(kind, bf)]
    assert plan.exact, str(report)
    v = torch.randn(3, pb.space.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert rel(ad.batch_hvp(plan, pb.loss, pb.space, pb.theta, pb.batch, v), eager_hvp(pb, v)) < 1e-12


# ------------------------------------------------------------------------------------------ per-example grads

#: (kind, composite) pairs where vmap over examples fails (an in-place op inside the RNN kernels under vmap)
VMAP_FAILS = {"lstm", "gru", "rnn"}


@pytest.mark.parametrize("kind, bf", ZOO, ids=ZOO_IDS)
def test_per_example_grads_of_every_strategy_equal_a_loop(kind, bf):
    """(c) every strategy, plain and composite kernels, equals one backward per example; only vmap fails, and
    only on the recurrent models."""
    pb = make(kind, batch_first=bf, n=5)
    ref = loop_grads(pb)
    for grads, composite in itertools.product(ad.GRAD_STRATEGIES, (False, True)):
        plan = ad.Differentiation(hvp=None, grads=grads, grads_composite=composite, jacobian_chunk=2)
        if grads == "vmap" and kind in VMAP_FAILS:
            with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
                ad.per_sample_grads(plan, pb.loss, pb.space, pb.theta, pb.batch)
            continue
        g = ad.per_sample_grads(plan, pb.loss, pb.space, pb.theta, pb.batch)
        assert g.shape == ref.shape
        assert rel(g, ref) < 1e-13, (grads, composite)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop, self.head = nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.tanh(self.lin(x))))


def test_randomness_of_the_jacobian_and_loop_strategies():
    pb = make("dense", model=DropoutNet())
    pb.model.train()  # dropout draws
    plans = {g: ad.Differentiation(hvp=None, grads=g) for g in ad.GRAD_STRATEGIES}
    for g in ("jacobian", "loop"):
        with pytest.raises(ad.RandomLossError, match=rf"randomness='error'\) with grads='{g}'"):
            ad.per_sample_grads(plans[g], pb.loss, pb.space, pb.theta, pb.batch)
        assert ad.per_sample_grads(plans[g], pb.loss, pb.space, pb.theta, pb.batch, randomness="different").shape == (4, 38)
    with pytest.raises(InfluenceConfigError, match=r"randomness='same'\) is not possible with grads='jacobian'"):
        ad.per_sample_grads(plans["jacobian"], pb.loss, pb.space, pb.theta, pb.batch, randomness="same")
    same = {}
    for g in ("vmap", "loop"):  # one shared draw: the loop replays the generator before each example
        torch.manual_seed(3)
        same[g] = ad.per_sample_grads(plans[g], pb.loss, pb.space, pb.theta, pb.batch, randomness="same")
    torch.testing.assert_close(same["loop"], same["vmap"], rtol=1e-12, atol=1e-14)
    with pytest.raises(ad.RandomLossError, match="eval mode"):
        ad.probe(pb.loss, pb.space, pb.theta, pb.batch)


# --------------------------------------------------------------------------------------------------- the probe

def test_probe_on_the_mlp_takes_the_preferred_strategy_first_and_rejects_nothing(probed):
    """(d) everything works on the MLP: taken in order, the plan is the first preferred strategy with vmap and
    plain kernels (on a CPU reverse over reverse, measured as fast or faster; forward over reverse when asked
    first); timed, it is an exact strategy (which one depends on the machine's timings)."""
    pb, plan, report = probed[("mlp", True)]
    assert not report.rejected(), str(report)
    assert plan.exact and not plan.embedding_bag
    assert all(a.status == "ok" for a in report.attempts)
    assert all((a.seconds is None) == (a.strategy == "finite_difference") for a in report.attempts)  # never chosen
    first, _ = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, select="first")
    assert (first.hvp, first.grads, first.hvp_composite) == ("reverse_over_reverse", "vmap", False)  # a CPU
    forward, _ = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, select="first",
                          prefer=("forward_over_reverse", "reverse_over_reverse"))
    assert forward == ad.Differentiation(embedding_bag=False) and (forward.hvp, forward.grads) == ("forward_over_reverse", "vmap")


def _raised(report: ad.ProbeReport, path: str, strategy: str, composite: bool) -> ad.Attempt:
    (a,) = [a for a in report.for_path(path) if (a.strategy, a.composite) == (strategy, composite)]
    assert a.status == "raised", a.line()
    return a


def test_probe_records_why_strategies_were_rejected(probed):
    """(d) each zoo model gets a working plan, and the report names the op and layer that stopped the others."""
    _, plan, report = probed[("tf", True)]
    assert plan.hvp_composite and plan.hvp in ("forward_over_reverse", "reverse_over_reverse")
    for hvp in ("forward_over_reverse", "reverse_over_reverse"):
        a = _raised(report, "hvp", hvp, False)
        assert a.op.startswith("_scaled_dot_product_flash_attention_for_cpu")
        assert a.layer == "`body.layers.0.self_attn` (MultiheadAttention)"
    assert "_scaled_dot_product_flash_attention_for_cpu" in str(report)
    for kind, bf in (("gru", True), ("gru", False), ("rnn", True), ("lstm", False)):
        _, plan, report = probed[(kind, bf)]
        assert plan.grads in ("jacobian", "loop"), str(report)  # the faster of the two, as timed here
        a = _raised(report, "grads", "vmap", False)
        assert a.layer == f"`body` ({kind.upper()})" and "broadcast shape" in a.error
    _, plan, report = probed[("bag", True)]
    assert plan.hvp_composite and plan.embedding_bag
    assert _raised(report, "hvp", "forward_over_reverse", False).op == "_embedding_bag"
    a = _raised(report, "hvp", "reverse_over_reverse", False)
    assert (a.op, a.layer) == ("_embedding_bag_backward", "`emb` (EmbeddingBag)")


def test_a_vmap_that_loops_over_examples_loses_to_the_same_strategy_batched(probed):
    """On the fused-attention transformer ``vmap`` with plain kernels runs CPU flash attention one example
    at a time (torch has no batching rule for it): the report says so, and the chosen per-example gradients
    are not that attempt (the composite kernels' ``vmap`` batches the math attention instead)."""
    _, plan, report = probed[("tf", True)]
    (plain,) = [a for a in report.for_path("grads") if (a.strategy, a.composite) == ("vmap", False)]
    assert plain.works and "_scaled_dot_product_flash_attention_for_cpu" in plain.fallback, plain.line()
    assert "vmap loops over examples for aten::_scaled_dot_product_flash_attention_for_cpu" in plain.line()
    assert (plan.grads, plan.grads_composite) != ("vmap", False), str(report)
    (batched,) = [a for a in report.for_path("grads") if (a.strategy, a.composite) == ("vmap", True)]
    assert batched.works and batched.fallback is None
    _, _, mlp_report = probed[("mlp", True)]
    assert all(a.fallback is None for a in mlp_report.attempts), str(mlp_report)


def test_choose_leaves_out_a_looping_attempt_only_when_its_strategy_batches_elsewhere():
    fast_loop = ad.Attempt("grads", "vmap", False, "ok", seconds=0.010, fallback="aten::op")
    batched = ad.Attempt("grads", "vmap", True, "ok", seconds=0.020)
    loop = ad.Attempt("grads", "loop", False, "ok", seconds=0.015)
    assert ad._choose([fast_loop, batched, loop], "fastest") is loop  # the fallback one is out; then the fastest
    assert ad._choose([fast_loop, batched], "fastest") is batched
    alone = ad.Attempt("grads", "vmap", True, "ok", seconds=0.012, fallback="aten::op")  # both kernels loop
    assert ad._choose([fast_loop, alone, loop], "fastest") is fast_loop
    assert ad._vmap_fallbacks([]) is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the mkldnn LSTM kernel is CPU float32 only")
def test_probe_on_the_float32_lstm_avoids_the_mkldnn_kernel():
    pb = make("lstm", dtype=torch.float32)
    plan, report = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, timing_examples=8, timing_vectors=4)
    a = _raised(report, "hvp", "forward_over_reverse", False)
    assert (a.op, a.layer) == ("mkldnn_rnn_layer", "`body` (LSTM)")
    assert plan.hvp == "reverse_over_reverse" or plan.hvp_composite, str(report)
    v = torch.randn(2, pb.space.num_params, generator=torch.Generator().manual_seed(0))
    assert rel(ad.batch_hvp(plan, pb.loss, pb.space, pb.theta, pb.batch, v), eager_hvp(pb, v)) < 1e-5


@pytest.mark.parametrize("fn", [NoBackward, BrokenBackward])
def test_probe_names_a_custom_function_without_a_working_backward(fn):
    """(e) nothing can differentiate it: the error names the Function and the layer applying it."""
    pb = make("dense", model=CustomNet(fn))
    with pytest.raises(ad.UnsupportedModelError) as info:
        ad.probe(pb.loss, pb.space, pb.theta, pb.batch)
    msg = str(info.value)
    assert f"no per-example gradient strategy works for this model: the failing one is op `{fn.__module__}.{fn.__name__}` " \
           "in layer `act` (Act)" in msg
    assert "needs a backward" in msg


def test_probe_without_exact_hvps_says_what_still_works():
    """An old-style Function (no setup_context): only eager autograd works, so the plan is the loop and finite
    differences; refusing finite differences names the Function and says EK-FAC/K-FAC can still run."""
    pb = make("dense", model=CustomNet(OldStyle))
    plan, report = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, select="first")
    assert (plan.hvp, plan.grads) == ("finite_difference", "loop")
    assert _raised(report, "hvp", "reverse_over_reverse", False).layer == "`act` (Act)"
    v = torch.randn(2, pb.space.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = eager_hvp(pb, v)  # eager double backward works: OldStyle's backward is differentiable
    assert rel(ad.batch_hvp(plan, pb.loss, pb.space, pb.theta, pb.batch, v), ref) < 1e-8
    with pytest.raises(ad.UnsupportedModelError) as info:
        ad.probe(pb.loss, pb.space, pb.theta, pb.batch, select="first", finite_differences=False)
    msg = str(info.value)
    assert f"no exact Hessian-vector product strategy works for this model: the failing one is op `{OldStyle.__module__}.OldStyle` " \
           "in layer `act` (Act)" in msg
    assert "Per-example gradients work (grads='loop'), so solver='ekfac' or solver='kfac' can still run" in msg


def test_probe_rejects_hvps_that_disagree_with_finite_differences():
    """A backward that is not differentiable gives the same wrong reverse-over-reverse HVP with both kernels; in
    float64 finite differences expose it and are used instead."""
    pb = make("dense", model=CustomNet(DetachedBackward))
    plan, report = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, select="first")
    assert plan.hvp == "finite_difference", str(report)
    wrong = [a for a in report.for_path("hvp") if a.status == "wrong"]
    assert {(a.strategy, a.composite) for a in wrong} == {("reverse_over_reverse", False), ("reverse_over_reverse", True)}
    assert all(a.rel_error > 1e-2 and a.reference == "finite differences" for a in wrong)
    assert any("not differentiable" in n for n in report.notes)


# ----------------------------------------------------------------------------------------- finite differences

#: measured on these models: 3e-11 – 2e-10 (float64), 3e-5 – 1e-4 (float32); see the module docstring
FD_BOUNDS = {torch.float64: 1e-8, torch.float32: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["mlp", "lstm", "bag"])
def test_finite_difference_hvp_relative_error(kind, dtype):
    """(f) central differences with ε = 0.3·u^{1/3}·‖θ‖/‖v‖ against the exact HVP."""
    pb = make(kind, dtype=dtype, n=8)
    v = torch.randn(4, pb.space.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    exact = ad.batch_hvp(ad.Differentiation(hvp="reverse_over_reverse", hvp_composite=True), pb.loss, pb.space,
                         pb.theta, pb.batch, v)
    fd = ad.batch_hvp(ad.Differentiation(hvp="finite_difference"), pb.loss, pb.space, pb.theta, pb.batch, v)
    assert rel(fd, exact) < FD_BOUNDS[dtype]
    assert ad.finite_difference_steps(pb.theta, torch.zeros(1, pb.space.num_params, dtype=dtype)).item() == 1.0


# ------------------------------------------------------------------------------------------------- validation

def test_plan_validation_and_record():
    with pytest.raises(InfluenceConfigError, match=r"Differentiation\(hvp='double_backward'\) is not an HVP strategy"):
        ad.Differentiation(hvp="double_backward")
    with pytest.raises(InfluenceConfigError, match=r"grads='jvp'"):
        ad.Differentiation(grads="jvp")
    with pytest.raises(InfluenceConfigError, match=r"Differentiation\(jacobian_chunk=0\) must be a positive integer"):
        ad.Differentiation(jacobian_chunk=0)
    pb = make("mlp")
    with pytest.raises(InfluenceConfigError, match="probe again with need_hvp=True"):
        ad.batch_hvp(ad.Differentiation(hvp=None), pb.loss, pb.space, pb.theta, pb.batch, pb.theta[None])
    with pytest.raises(InfluenceConfigError, match="select='slow'"):
        ad.probe(pb.loss, pb.space, pb.theta, pb.batch, select="slow")
    plan, report = ad.probe(pb.loss, pb.space, pb.theta, pb.batch, need_hvp=False, select="first")
    assert plan.hvp is None and not report.for_path("hvp")
    assert ad.DEFAULT_PLAN.as_dict() == {"hvp": "forward_over_reverse", "grads": "vmap", "hvp_composite": False,
                                         "grads_composite": False, "jacobian_chunk": 8, "embedding_bag": True}
    assert str(plan) == "hvp=none, grads=vmap (plain kernels)"


@pytest.mark.parametrize("mode, layout", [("sum", "1d"), ("mean", "2d"), ("max", "2d"), ("max", "1d-last")])
def test_composite_embedding_bag_second_derivatives(mode, layout):
    """Forward over reverse through the composite (vmapped over tangents) equals the dense Hessian."""
    inp, offsets, last = BAG_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(VOCAB, 3, generator=gen, dtype=torch.float64)
    bags = 3 if offsets is None else len(offsets) - int(last)
    c = torch.randn(bags, 3, generator=gen, dtype=torch.float64)

    def f(w: Tensor) -> Tensor:
        out = ad.composite_embedding_bag(inp, w, offsets, mode=mode, include_last_offset=last, padding_idx=2)
        return (torch.tanh(out) * c).sum()

    dense = torch.autograd.functional.hessian(f, w0).reshape(w0.numel(), w0.numel())
    v = torch.randn(3, VOCAB, 3, generator=gen, dtype=torch.float64)
    hv = torch.func.vmap(lambda t: torch.func.jvp(torch.func.grad(f), (w0,), (t,))[1])(v)
    torch.testing.assert_close(hv.reshape(3, -1), v.reshape(3, -1) @ dense, rtol=1e-12, atol=1e-12)
