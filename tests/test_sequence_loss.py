"""The default loss on sequences: a language model's ``[B, T, V]`` logits with ``[B, T]`` targets give the
per-sequence sum of token cross-entropies (padding, ``-100``, masked), with no ``influence_loss`` written; its
Fisher draws one independent token sketch per position (the true Fisher of the summed loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceConfigError, compute_influence
from lightning_influence.data import ExampleSource
from lightning_influence.objective import IGNORE_INDEX, Objective, class_dim, default_loss_fn
from lightning_influence.problem import InfluenceProblem

from .problems import pearson_rows
from .zoo import lm_sequence_loss

D = torch.float64
V, T = 7, 5


class TinyLM(nn.Module):
    """Embedding, a causal mix of the previous position, and an LM head: logits ``[B, T, V]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(V, 4), nn.Linear(8, 4), nn.Linear(4, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return self.head(torch.tanh(self.mix(torch.cat([h, prev], dim=-1))))


def lm_data(n: int = 24, seed: int = 0, pad: bool = True) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (n, T + 1), generator=g)
    targets = seq[:, 1:].clone()
    if pad:  # sequences of lengths 2..T: the rest is padding
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        targets[torch.arange(T)[None, :] >= lengths[:, None]] = IGNORE_INDEX
    return TensorDataset(seq[:, :-1], targets)


def test_the_default_loss_sums_token_cross_entropies_and_masks_padding():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(3, T, V, generator=g, dtype=D), torch.randint(0, V, (3, T), generator=g)
    targets[0, 3:] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX
    want = torch.stack([sum(F.cross_entropy(logits[b, t], targets[b, t], reduction="sum")
                            for t in range(T) if targets[b, t] != IGNORE_INDEX) if (targets[b] != IGNORE_INDEX).any()
                        else torch.zeros((), dtype=D) for b in range(3)])
    torch.testing.assert_close(default_loss_fn(logits, targets), want, rtol=1e-12, atol=1e-12)
    # torch's own layout [B, V, T] gives the same; plain classification is unchanged
    torch.testing.assert_close(default_loss_fn(logits.transpose(1, 2).contiguous(), targets), want, rtol=1e-12, atol=1e-12)
    assert class_dim(logits, targets) == 2 and class_dim(logits[:, 0], targets[:, 0]) == 1
    torch.testing.assert_close(default_loss_fn(logits[:, 0], targets[:, 1].clamp(min=0)),
                               F.cross_entropy(logits[:, 0], targets[:, 1].clamp(min=0), reduction="none"))


def test_compute_influence_on_a_language_model_needs_no_loss():
    """The default loss gives the scores of the explicit per-sequence loss, exactly (float64, exact solve)."""
    torch.manual_seed(0)
    model, data = TinyLM().double(), lm_data(pad=False)
    kw = dict(query_indices=[0, 3], solver="exact", damping=0.1, dtype=D, self_influence=True)
    default = compute_influence(model, data, **kw)
    explicit = compute_influence(model, data, loss_fn=lm_sequence_loss, **kw)
    torch.testing.assert_close(default.scores, explicit.scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(default.self_influence, explicit.self_influence, rtol=1e-10, atol=1e-12)


def test_padding_carries_no_influence():
    """A sequence's padded positions change nothing: its scores equal those of the sequence cut to its tokens
    (here: the padding's token ids changed, which the loss must not see)."""
    torch.manual_seed(0)
    model, data = TinyLM().double(), lm_data()
    inputs, targets = data.tensors
    other = inputs.clone()
    other[targets == IGNORE_INDEX] = (other[targets == IGNORE_INDEX] + 1) % V  # inputs after the last token differ
    kw = dict(query_indices=[1, 2], solver="exact", damping=1.0, dtype=D)
    a = compute_influence(model, data, **kw)
    # inputs at padded positions still feed later positions' logits only through the causal mix, and every later
    # position is padding too, so nothing that the loss sees changes
    b = compute_influence(model, TensorDataset(other, targets), **kw)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-8, atol=1e-10)
    # a fully padded sequence has zero loss, zero gradient and zero scores
    targets2 = targets.clone()
    targets2[4] = IGNORE_INDEX
    c = compute_influence(model, TensorDataset(inputs, targets2), query_indices=[1], solver="exact", damping=1.0, dtype=D)
    assert float(c.scores[0, 4].abs()) < 1e-14


def test_the_fisher_draws_one_token_sketch_per_position():
    """``E[δ δᵀ]`` per position is ``diag(p) − ppᵀ``, positions are uncorrelated, padding draws nothing."""
    torch.manual_seed(0)
    model, data = TinyLM().double(), lm_data(n=2)
    obj = Objective(model, dtype=D)
    batch = obj.prepare_batch(data[:2])
    draws = torch.stack([obj.fisher_batch(batch, seed, [0, 1])[1] for seed in range(3000)])  # [S, 2, T, V]
    assert draws.shape == (3000, 2, T, V)
    pad = batch[1] == IGNORE_INDEX
    assert bool(pad.any()) and float(draws[:, pad].abs().max()) == 0.0
    p = torch.softmax(obj.outputs(batch).detach(), dim=-1)
    b, t = (~pad).nonzero()[0].tolist()
    cov = torch.einsum("si,sj->ij", draws[:, b, t], draws[:, b, t]) / draws.shape[0]
    want = torch.diag(p[b, t]) - torch.outer(p[b, t], p[b, t])
    assert float((cov - want).abs().max()) < 0.02, (cov - want).abs().max()
    t2 = next(s for s in range(T) if s != t and not pad[b, s])
    cross = torch.einsum("si,sj->ij", draws[:, b, t], draws[:, b, t2]) / draws.shape[0]
    assert float(cross.abs().max()) < 0.02
    ds = ExampleSource(data, None, obj.prepare_batch)
    assert InfluenceProblem(obj, ds).objective.fisher == "sampled"


def test_a_token_outside_the_vocabulary_is_named():
    model, data = TinyLM().double(), lm_data()
    inputs, targets = data.tensors
    targets = targets.clone()
    targets[5, 0] = V  # one past the vocabulary (V = 7 ≠ T = 5: the classes are the last dimension)
    with pytest.raises(InfluenceConfigError, match=rf"example 5 has label {V}, outside 0..{V - 1}: the model outputs {V} classes"):
        compute_influence(model, TensorDataset(inputs, targets), query_indices=[0], solver="exact", damping=0.1, dtype=D)


def true_fisher(model: nn.Module, data: TensorDataset) -> torch.Tensor:
    """The Gauss–Newton matrix of the mean summed token loss, ``(1/n) Σ_i Σ_t J_tᵀ(diag p_t − p_t p_tᵀ)J_t``
    over the unpadded positions, from explicit Jacobians."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(p, tokens):
        return functional_call(model, p, (tokens[None],))[0]

    inputs, targets = data.tensors
    total = 0
    for x, y in zip(inputs, targets):
        jac = jacrev(logits)(params, x)
        j = torch.cat([jac[n].reshape(T, V, -1) for n in names], dim=-1)  # [T, V, P]
        p = torch.softmax(logits(params, x), dim=-1)
        for t in (y != IGNORE_INDEX).nonzero().flatten().tolist():
            total = total + j[t].T @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ j[t]
    return total / len(inputs)


def test_ekfac_on_the_language_model_approximates_its_true_fisher():
    """EK-FAC/K-FAC with the default loss (sampled per-token Fisher, no user code) against the dense solve with
    the true Fisher of the summed token losses: measured Pearson per query 0.95–0.99 (EK-FAC) at λ = 0.1."""
    torch.manual_seed(0)
    model, data = TinyLM().double(), lm_data()
    queries = list(range(6))
    fisher = true_fisher(model, data)
    inputs, targets = data.tensors
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):
        return default_loss_fn(functional_call(model, p, (x[None],)), y[None]).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    grads = torch.cat([g[n].reshape(len(inputs), -1) for n in names], dim=1)
    want = -(grads[queries] @ torch.linalg.solve(fisher + 0.1 * torch.eye(len(fisher), dtype=D), grads.T))
    for solver in ("ekfac", "kfac"):
        res = compute_influence(model, data, query_indices=queries, solver=solver, damping=0.1, dtype=D)
        assert res.settings["fisher"] == "sampled"
        r = pearson_rows(res.scores, want)
        assert float(r.min()) > 0.9, (solver, r)
