"""Per-token influence of a language model's queries (``per_token=True``): each token row against an explicit
``−g_tᵀ(H + λI)⁻¹g_i`` (float64, explicit Hessian), the rows summing to the sequence scores, padding excluded,
every solver kind, the save/load round trip and the errors when the loss cannot be split into tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceConfigError, InfluenceResults, compute_influence
from lightning_influence.objective import IGNORE_INDEX
from lightning_influence.solvers.cg import CGSettings

from .test_sequence_loss import TinyLM, lm_data

D = torch.float64
QUERIES = [0, 3, 5, 7]
DAMPING = 2.0  # H + λI positive definite for TinyLM at its initial weights


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TinyLM().double(), lm_data(n=20)


def _flat(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            out[n] = v[i : i + k].view(s)
            i += k
        return out

    return theta, unflat


def _explicit(model, data, queries, damping):
    """``(token rows {(q, t): [N]}, sequence rows [Q, N])`` from first principles: the explicit Hessian of the
    mean training loss, token gradients of one position's cross-entropy."""
    theta, unflat = _flat(model)
    x, y = data.tensors

    def seq_loss(v, xi, yi):
        logits = functional_call(model, unflat(v), (xi[None],))[0]
        return F.cross_entropy(logits, yi, ignore_index=IGNORE_INDEX, reduction="sum")

    def tok_loss(v, xi, target, t):
        logits = functional_call(model, unflat(v), (xi[None],))[0]
        return F.cross_entropy(logits[t], target)

    h = hessian(lambda v: torch.stack([seq_loss(v, x[i], y[i]) for i in range(len(x))]).mean())(theta)
    inv = torch.linalg.inv(h + damping * torch.eye(h.shape[0], dtype=D))
    g_train = vmap(grad(seq_loss), in_dims=(None, 0, 0))(theta, x, y)  # [N, P]
    tokens, seqs = {}, []
    for q in queries:
        seqs.append(-(grad(seq_loss)(theta, x[q], y[q]) @ inv @ g_train.T))
        for t in range(y.shape[1]):
            if y[q, t] != IGNORE_INDEX:
                tokens[(q, t)] = -(grad(tok_loss)(theta, x[q], y[q, t], t) @ inv @ g_train.T)
    return tokens, torch.stack(seqs)


def _summed(res: InfluenceResults) -> torch.Tensor:
    return torch.zeros_like(res.scores).index_add_(0, res.token_rows, res.token_scores)


def test_token_rows_equal_the_explicit_computation_and_sum_to_the_sequence_scores(lm):
    model, data = lm
    res = compute_influence(model, data, query_indices=QUERIES, solver="exact", damping=DAMPING, dtype=D,
                            per_token=True)
    tokens, seqs = _explicit(model, data, QUERIES, DAMPING)
    y = data.tensors[1]
    # padding (-100) has no row; every real target one, in row-major order
    want = [(r, t) for r, q in enumerate(QUERIES) for t in range(y.shape[1]) if y[q, t] != IGNORE_INDEX]
    assert any((y[q] == IGNORE_INDEX).any() for q in QUERIES)  # the fixture pads some of these queries
    assert list(zip(res.token_rows.tolist(), res.token_positions.tolist())) == want
    assert res.token_targets.tolist() == [int(y[QUERIES[r], t]) for r, t in want]
    for k, (r, t) in enumerate(want):
        torch.testing.assert_close(res.token_scores[k], tokens[(QUERIES[r], t)], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.scores, seqs, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(_summed(res), res.scores, rtol=1e-12, atol=1e-11)
    # the sequence scores are those of a run without per_token
    plain = compute_influence(model, data, query_indices=QUERIES, solver="exact", damping=DAMPING, dtype=D)
    torch.testing.assert_close(plain.scores, res.scores, rtol=0, atol=0)
    assert plain.token_scores is None and not plain.has_token_scores
    dense = res.dense_token_scores()
    assert dense.shape == (len(QUERIES), y.shape[1], len(data))
    torch.testing.assert_close(dense.nansum(1), res.scores, rtol=1e-12, atol=1e-11)
    assert bool(dense[1, (y[QUERIES[1]] == IGNORE_INDEX)].isnan().all())


def _masked_queries(data, queries):
    """Every (query, token) as an example of its own: the query with every other target set to -100."""
    x, y = data.tensors
    xs, ys = [], []
    for q in queries:
        for t in range(y.shape[1]):
            if y[q, t] != IGNORE_INDEX:
                keep = torch.full_like(y[q], IGNORE_INDEX)
                keep[t] = y[q, t]
                xs.append(x[q])
                ys.append(keep)
    return TensorDataset(torch.stack(xs), torch.stack(ys))


@pytest.mark.parametrize("solver", ["cg", "ekfac"])
def test_token_rows_on_other_solvers_are_the_masked_queries_scores(lm, solver):
    """With a CG solve and an EK-FAC inverse: the token rows sum to the sequence scores, and each is the score of
    the query cut to that one token (a separate run of the same solver, per_token=False)."""
    model, data = lm
    settings = CGSettings(tol=1e-12) if solver == "cg" else solver
    kw = dict(solver=settings, damping=DAMPING, dtype=D)
    res = compute_influence(model, data, query_indices=QUERIES, per_token=True, **kw)
    masked = _masked_queries(data, QUERIES)
    each = compute_influence(model, data, masked, query_indices=list(range(len(masked))), **kw)
    tol = dict(rtol=1e-7, atol=1e-9) if solver == "cg" else dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(res.token_scores, each.scores, **tol)
    torch.testing.assert_close(_summed(res), res.scores, **tol)
    if solver == "ekfac":  # the same inverse whatever the right-hand sides: the scores are those without tokens
        plain = compute_influence(model, data, query_indices=QUERIES, **kw)
        torch.testing.assert_close(plain.scores, res.scores, rtol=1e-12, atol=1e-12)


def test_token_scores_survive_save_and_load(lm, tmp_path):
    model, data = lm
    res = compute_influence(model, data, query_indices=[1, 2], solver="exact", damping=DAMPING, dtype=D, per_token=True)
    path = tmp_path / "r.pt"
    res.save(path)
    back = InfluenceResults.load(path)
    for name in ("token_scores", "token_rows", "token_positions", "token_targets", "scores"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    one = back.tokens_of(query_id=2)
    assert torch.equal(one.scores, res.token_scores[res.token_rows == 1])
    # a flipped token score is caught by the checksum
    state = torch.load(path, weights_only=True)
    state["token_scores"][0, 0] += 1.0
    torch.save(state, path)
    with pytest.raises(Exception, match="checksum"):
        InfluenceResults.load(path)
    # results without tokens still load, and have none
    plain = compute_influence(model, data, query_indices=[1], solver="exact", damping=DAMPING, dtype=D)
    plain.save(path)
    assert InfluenceResults.load(path).token_scores is None
    with pytest.raises(InfluenceConfigError, match="per_token=True"):
        plain.tokens_of(0)


def test_per_token_refuses_what_it_cannot_split(lm):
    model, data = lm
    kw = dict(query_indices=[0], solver="exact", damping=DAMPING, dtype=D, per_token=True)

    def worst_token(logits, targets):  # the largest token loss: not a sum, the token losses do not add up
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").amax(1)

    with pytest.raises(InfluenceConfigError, match="per_token=True: the token losses of query example 0 add up"):
        compute_influence(model, data, loss_fn=worst_token, **kw)
    clf = TensorDataset(torch.randn(10, 3, dtype=D), torch.randint(0, 2, (10,)))
    with pytest.raises(InfluenceConfigError, match=r"per_token=True needs integer token targets \[B, T\]"):
        compute_influence(torch.nn.Linear(3, 2).double(), clf, **kw)

    class Hooked(TinyLM):
        def influence_loss(self, batch):
            return F.cross_entropy(self(batch[0]).transpose(1, 2), batch[1], reduction="none").sum(1)

    hooked = Hooked().double()
    with pytest.raises(InfluenceConfigError, match="defines influence_loss.*pass per_token=False"):
        compute_influence(hooked, data, **kw)
    with pytest.raises(InfluenceConfigError, match="per_token='yes' must be True or False"):
        compute_influence(model, data, **{**kw, "per_token": "yes"})


def test_nested_inputs_are_indexed_per_token(lm):
    """Inputs as a dict of tensors (any nesting): each token's copy takes its query's entries."""
    model, data = lm

    class DictLM(TinyLM):
        def forward(self, inputs):
            return super().forward(inputs["ids"])

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            x, y = data[i]
            return {"ids": x}, y

    nested = DictLM().double()
    nested.load_state_dict(model.state_dict())
    kw = dict(query_indices=QUERIES, solver="exact", damping=DAMPING, dtype=D, per_token=True)
    want = compute_influence(model, data, **kw)
    got = compute_influence(nested, Dicts(), **kw)
    torch.testing.assert_close(got.token_scores, want.token_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["lissa", "arnoldi", "kfac"])
def test_token_rows_sum_to_the_sequence_scores_with_the_other_solvers(lm, solver):
    """Each solver's fitted inverse is linear in its right-hand sides (LiSSA's seeded recursion too), so the token
    rows, solved apart from the sequences, add up to the sequence scores to rounding."""
    model, data = lm
    res = compute_influence(model, data, query_indices=QUERIES, solver=solver, damping=DAMPING, dtype=D, per_token=True)
    torch.testing.assert_close(_summed(res), res.scores, rtol=1e-10, atol=1e-12 * float(res.scores.abs().max()))
