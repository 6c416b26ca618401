"""Layer adapters for K-FAC/EK-FAC (Embedding, Conv1d, MultiheadAttention) against exact answers: the
per-example gradients rebuilt from the captured ``(g, a)`` equal autograd's, K-FAC is the exact Fisher
where the Fisher provably factorises, EK-FAC's eigenvalues are the Fisher's exact diagonal in its
eigenbasis on a transformer block, and the coverage a transformer reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence.solvers.ekfac import EKFACSettings, KFACSettings
from lightning_influence.solvers.kronecker import (EmbeddingAdapter, MultiheadAttentionAdapter, adapter_for,
                                                   capture_layers, per_example_blocks, plan_layers)

from .test_ekfac import D, dot_loss, explicit_fisher, flat_eigenbasis, half_sq, make_problem


class Flat(nn.Module):
    """``layer(x)`` flattened to ``[B, -1]`` (so ``half_sq``/``dot_loss`` see one vector per example)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).flatten(1)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` on ``[B, T, E]`` inputs: self-attention (optionally a causal mask and a
    key padding mask), or cross-attention of the first 2 tokens on the other ones (key is value), with
    ``batch_first`` either way (the inputs are transposed for ``batch_first=False``)."""

    def __init__(self, batch_first: bool, cross: bool = False, masks: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.cross, self.masks = cross, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = (x[:, :2], x[:, 2:]) if self.cross else (x, x)
        if not self.attn.batch_first:
            q, kv = (q.transpose(0, 1), kv.transpose(0, 1)) if self.cross else (x.transpose(0, 1),) * 2
        kwargs = {}
        if self.masks:
            t = x.shape[1]
            padding = torch.zeros(x.shape[0], t, dtype=torch.bool)
            padding[:, -1] = True  # the last token is padding for every example
            kwargs = {"attn_mask": torch.triu(torch.ones(t, t, dtype=torch.bool), 1), "key_padding_mask": padding}
        out = self.attn(q, kv, kv, need_weights=False, **kwargs)[0]
        out = out if self.attn.batch_first else out.transpose(0, 1)
        return torch.tanh(out).flatten(1)


def _case(kind: str) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "embedding":
        x = torch.randint(0, 7, (9, 4), generator=g)
        x[0, :2] = 2  # a repeated token in one example: its row sums two positions
        return Flat(nn.Embedding(7, 3, padding_idx=2)), x
    if kind.startswith("conv1d"):
        layer = {"conv1d": nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2),
                 "conv1d_same_reflect": nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect", bias=False),
                 "conv1d_valid": nn.Conv1d(2, 3, 2, padding="valid")}[kind]
        return Flat(layer), torch.randn(9, 2, 7, generator=g)
    batch_first = not kind.endswith("seq_first")
    return Attention(batch_first, cross="cross" in kind, masks="masks" in kind), torch.randn(9, 5, 6, generator=g)


CASES = ["embedding", "conv1d", "conv1d_same_reflect", "conv1d_valid", "mha_self", "mha_self_seq_first",
         "mha_self_masks", "mha_cross", "mha_cross_seq_first"]


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("kind", CASES)
def test_captured_factors_rebuild_the_per_example_gradients(kind):
    """``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` from :func:`capture_layers` equals autograd's per-example gradient
    of every factored layer (float64, empirical Fisher so the capture's loss is the training loss): this
    checks each adapter's orientation (Embedding rows = vocabulary, ``weight.reshape(V, E)``), patch order
    (Conv1d), padding (Embedding ``padding_idx`` and Conv1d modes), the MHA rerouting (self- and
    cross-attention, both layouts, masks) and the ``out_proj`` it makes visible."""
    torch.manual_seed(0)
    model, x = _case(kind)
    model = model.double()
    x = x if x.dtype == torch.long else x.double()
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=D)
    problem = make_problem(model, TensorDataset(x, y), half_sq)
    obj = problem.objective
    batch = obj.prepare_batch((x, y))
    plan = plan_layers(obj, batch)
    want = ["attn", "attn.out_proj"] if kind.startswith("mha") else ["layer"]
    assert [l.name for l in plan.layers] == want and plan.kronecker_coverage == 1.0
    grads = problem.example_grads(batch)
    for layer, (a, g) in zip(plan.layers, capture_layers(obj, plan, batch)):
        rebuilt = torch.cat(list(per_example_blocks(a, g)))
        torch.testing.assert_close(rebuilt, layer.gather(grads), rtol=1e-10, atol=1e-12)
    if kind == "embedding":
        assert bool((layer.gather(grads)[:, 2] == 0).all())  # padding row: no gradient


@pytest.mark.parametrize("batch_first", [True, False])
def test_rerouted_attention_output_equals_the_module_output(batch_first):
    """:meth:`MultiheadAttentionAdapter.recompute` returns the module's own output and weights (to
    round-off), so the rest of the model sees the same values during capture."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 3, batch_first=batch_first, add_bias_kv=True).double().eval()
    x = torch.randn(4, 5, 6, dtype=D)
    t = 5 if batch_first else 4  # sequence length: x is [B, T, E] or [T, B, E]
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    out, w = mha(x, x, x, attn_mask=mask)
    (out2, w2), target, (inp,) = MultiheadAttentionAdapter.recompute(mha, (x, x, x), {"attn_mask": mask})
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w2, w, rtol=1e-12, atol=1e-13)
    assert target.shape == ((4, 5, 18) if batch_first else (5, 4, 18))  # batch-first [B, T, 3E]
    assert inp is (x if batch_first else inp) and inp.shape[:2] == target.shape[:2]


@pytest.mark.parametrize("settings", [EKFACSettings(calibrate=False), KFACSettings(calibrate=False)], ids=["ekfac", "kfac"])
@pytest.mark.parametrize("kind", ["embedding", "conv1d"])
def test_kronecker_inverse_is_exact_when_fisher_factorises(kind, settings):
    """Why exact: with ``ℓ = outᵀ t`` the output gradient is ``t`` whatever the input. An Embedding with
    one token per example has ``G_i = e_{x_i} t_iᵀ`` ``[V, E]``, a Conv1d whose kernel spans the whole input
    (one position) ``G_i = t_i x̃_iᵀ`` (``x̃`` the flattened window, ``[x̃, 1]`` with the bias). On the full
    product of inputs × targets, each pair once, the empirical Fisher ``(1/n) Σ vec(G_i) vec(G_i)ᵀ``
    factorises into ``E[rowrowᵀ] ⊗ E[colcolᵀ]``, which is ``S ⊗ A`` (``T = 1``); so K-FAC and EK-FAC equal the
    dense ``(F + λI)⁻¹``. For the Embedding the padding row (token 0 never occurs, index 4 is padding)
    has zero curvature and is damped only."""
    torch.manual_seed(0)
    if kind == "embedding":
        inputs = torch.tensor([[1], [2], [3], [4], [1]])  # 4 = padding_idx; token 1 twice
        model = Flat(nn.Embedding(5, 3, padding_idx=4))
        t = torch.randn(4, 3, dtype=D)
    else:
        inputs = torch.randn(5, 2, 3, dtype=D)
        model = Flat(nn.Conv1d(2, 3, 3))
        t = torch.randn(4, 3, dtype=D)
    x = inputs.repeat_interleave(len(t), 0)
    y = t.repeat(len(inputs), 1)
    problem = make_problem(model.double(), TensorDataset(x, y), dot_loss, chunk_size=7)
    inv = settings.fit(problem, 0.05)
    assert [l.name for l in inv.plan.layers] == ["layer"]
    f = explicit_fisher(problem)
    v = torch.randn(3, problem.num_params, dtype=D)
    want = torch.linalg.solve(f + 0.05 * torch.eye(problem.num_params, dtype=D), v.T).T
    torch.testing.assert_close(inv.apply(v), want, rtol=1e-10, atol=1e-12)


class Tiny(nn.Module):
    """Embedding (padding 0) + learned positions + one ``nn.TransformerEncoderLayer(8, 2 heads, ff 16)`` +
    mean pooling + linear head: 755 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(5, 8))
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tok) + self.pos).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_ekfac_on_a_transformer_block_is_the_exact_diagonal_and_reports_coverage():
    """EK-FAC on :class:`Tiny` (755 parameters, empirical Fisher of a squared loss): Λ is exactly
    ``diag(Qᵀ F Q)`` of the explicit Fisher in its eigenbasis (true for any model: the eigenvalue correction
    is that diagonal). Coverage measured before this change (Linear/Conv2d adapters only: linear1, linear2,
    head): 307 of 755 parameters, 0.4066; now (Embedding, in-projection, out_proj too): 683 of 755, 0.9046;
    the positions and both LayerNorms stay diagonal and are named. (A ``batch_first=False`` layer still
    raises: its ``linear1``/``linear2`` see sequence-first inputs; seq-first attention itself is covered
    above.)"""
    torch.manual_seed(0)
    model = Tiny().double().eval()
    x = torch.randint(0, 11, (24, 5))
    y = torch.randn(24, 3, dtype=D)
    problem = make_problem(model, TensorDataset(x, y), half_sq, chunk_size=10)
    inv = EKFACSettings(calibrate=False).fit(problem, 0.1)
    setup = {d.name: d.value for d in inv.setup}
    assert setup["kronecker_layers"] == "emb, enc.self_attn, enc.self_attn.out_proj, enc.linear1, enc.linear2, head"
    assert setup["diagonal_params"] == "pos, enc.norm1.weight, enc.norm1.bias, enc.norm2.weight, enc.norm2.bias"
    assert setup["kronecker_coverage"] == pytest.approx(683 / 755) and 683 / 755 > 0.4066
    inv.q_a, inv.q_s = [m.contiguous() for m in inv.q_a], [m.contiguous() for m in inv.q_s]  # torch.kron
    q, lam = flat_eigenbasis(inv)  # of an eigh (column-major) and an identity fails on strides
    torch.testing.assert_close(q.T @ q, torch.eye(len(lam), dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(lam, torch.diagonal(q.T @ explicit_fisher(problem) @ q), rtol=1e-8, atol=1e-13)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_coverage_reaches_the_results():
    """``compute_influence(..., solver="ekfac")`` on the transformer carries ``kronecker_coverage`` in its
    setup diagnostics (sampled Fisher, float32)."""
    from lightning_influence import compute_influence

    torch.manual_seed(0)
    ds = TensorDataset(torch.randint(0, 11, (16, 5)), torch.randint(0, 3, (16,)))
    res = compute_influence(Tiny().eval(), ds, num_queries=2, solver="ekfac", damping=0.1)
    setup = {d.name: d.value for d in res.setup_diagnostics()}
    assert setup["kronecker_coverage"] == pytest.approx(683 / 755)
    assert bool(torch.isfinite(res.scores).all())


def test_adapter_registry_and_fallbacks():
    """Which instances are factored: grouped Conv1d, ``scale_grad_by_freq`` and vocabularies above
    :attr:`EmbeddingAdapter.max_vocab` rows, and MHA with separate q/k/v weights stay diagonal."""
    assert adapter_for(nn.Conv1d(2, 3, 3)).__name__ == "Conv1dAdapter"
    assert adapter_for(nn.Conv1d(2, 4, 3, groups=2)) is None
    assert adapter_for(nn.Embedding(5, 2)) is EmbeddingAdapter
    assert adapter_for(nn.Embedding(5, 2, scale_grad_by_freq=True)) is None
    assert adapter_for(nn.Embedding(EmbeddingAdapter.max_vocab + 1, 1)) is None
    assert adapter_for(nn.MultiheadAttention(4, 2)) is MultiheadAttentionAdapter
    assert adapter_for(nn.MultiheadAttention(4, 2, kdim=3, vdim=3)) is None


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_causal_pre_norm_block_captures_exact_gradients():
    """The zoo's causal LM (pre-norm ``TransformerEncoderLayer`` called with ``src_mask`` and
    ``is_causal=True``, per-token cross-entropy summed per sequence): every factored layer's rebuilt
    per-example gradient equals autograd's, so the rerouted attention honours the causal mask."""
    from tests.zoo import CausalLM, lm_sequence_loss

    torch.manual_seed(0)
    model = CausalLM(vocab=7, seq_len=6, d_model=8, nhead=2, ff=12).double().eval()
    x = torch.randint(0, 7, (6, 6))
    problem = make_problem(model, TensorDataset(x[:, :-1], x[:, 1:]), lm_sequence_loss)
    obj = problem.objective
    batch = obj.prepare_batch((x[:, :-1], x[:, 1:]))
    plan = plan_layers(obj, batch)
    assert [l.name for l in plan.layers] == ["embed", "block.self_attn", "block.self_attn.out_proj",
                                             "block.linear1", "block.linear2", "lm_head"]
    grads = problem.example_grads(batch)
    for layer, (a, g) in zip(plan.layers, capture_layers(obj, plan, batch)):
        torch.testing.assert_close(torch.cat(list(per_example_blocks(a, g))), layer.gather(grads),
                                   rtol=1e-10, atol=1e-12)


class _TokenEncoder(nn.Module):
    """Embedding, one ``nn.TransformerEncoderLayer`` batch-first or not (the same weights), mean pool, head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(12, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x if self.batch_first else x.T)  # sequence-first: tokens [T, B], activations [T, B, E]
        h = self.enc(h)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("settings", [EKFACSettings(calibrate=False), KFACSettings(calibrate=False)], ids=["ekfac", "kfac"])
def test_a_sequence_first_transformer_is_factored_as_the_batch_first_one(settings):
    """``TransformerEncoderLayer(batch_first=False)``: its Linear layers see ``[T, B, E]`` and the embedding
    ``[T, B]`` tokens; they are factored over the same (example, position) pairs as batch-first, so the inverse,
    the coverage and the scores are the batch-first model's to round-off."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 12, (60, 8)), torch.randint(0, 3, (60,))
    ds = TensorDataset(x, y)
    torch.manual_seed(1)
    first = _TokenEncoder(True).to(D)
    seq = _TokenEncoder(False).to(D)
    seq.load_state_dict(first.state_dict())
    fits = [settings.fit(make_problem(m, ds), 0.1) for m in (first, seq)]
    v = torch.randn(3, sum(p.numel() for p in first.parameters()), dtype=D)
    torch.testing.assert_close(fits[1].apply(v), fits[0].apply(v), rtol=1e-9, atol=1e-12)
    setup = [{d.name: d.value for d in f.setup} for f in fits]
    assert setup[0]["kronecker_coverage"] == setup[1]["kronecker_coverage"] > 0.9
    assert setup[0]["kronecker_layers"] == setup[1]["kronecker_layers"]
    assert "linear1" in setup[1]["kronecker_layers"] and "emb" in setup[1]["kronecker_layers"]


class _Decoder(nn.Module):
    """Embedding, one ``nn.TransformerDecoderLayer`` (self-attention on the first 4 tokens, cross-attention on the
    other 4 as memory), mean pool, head; ``batch_first`` either way."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(12, 8)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        tgt, memory = h[:, :4], h[:, 4:]
        if not self.batch_first:
            tgt, memory = tgt.transpose(0, 1), memory.transpose(0, 1)
        h = self.dec(tgt, memory)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_a_transformer_decoder_layer_is_factored_exactly(batch_first):
    """``nn.TransformerDecoderLayer``: its self-attention, cross-attention (query from the target, key and value
    from the memory), both out-projections, the feed-forward Linears, the embedding and the head are Kronecker
    layers whose captured factors rebuild autograd's per-example gradients; only the three LayerNorms are
    diagonal, and the coverage says so."""
    torch.manual_seed(0)
    model = _Decoder(batch_first).double()
    x, y = torch.randint(0, 12, (7, 8)), torch.randint(0, 3, (7,))
    problem = make_problem(model, TensorDataset(x, y))
    obj = problem.objective
    batch = obj.prepare_batch((x, y))
    plan = plan_layers(obj, batch)
    assert [l.name for l in plan.layers] == ["emb", "dec.self_attn", "dec.self_attn.out_proj", "dec.multihead_attn",
                                             "dec.multihead_attn.out_proj", "dec.linear1", "dec.linear2", "head"]
    norms = sum(p.numel() for n, p in model.named_parameters() if ".norm" in n)
    assert plan.kronecker_coverage == pytest.approx(1 - norms / sum(p.numel() for p in model.parameters()))
    assert all(".norm" in n for n in plan.diagonal_user_names)
    grads = problem.example_grads(batch)
    for layer, (a, g) in zip(plan.layers, capture_layers(obj, plan, batch)):
        rebuilt = torch.cat(list(per_example_blocks(a, g)))
        torch.testing.assert_close(rebuilt, layer.gather(grads), rtol=1e-9, atol=1e-11)
