"""The public phases of the functional core, and the work split over processes without any processes:
``compute_influence`` equals the phases composed by hand, shards of the scores put together equal the
whole, and two ranks simulated by threads (an in-memory communicator) give the single-process scores
and agree on a failure."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_influence import compute_influence
from lightning_influence.distributed import Communicator, PeerFailedError
from lightning_influence.pipeline import (bind, fit_inverse, frozen_module, query_gradients, self_influence_scores,
                                          solve_queries)
from lightning_influence.scoring import influence_scores, score_shard
from lightning_influence.validation import check_run_arguments

from .problems import trained_logreg
from .threads import FakeRank, run_ranks

QUERIES = [0, 5, 17]


@pytest.fixture(scope="module")
def logreg():
    return trained_logreg(n_train=120)


def test_compute_influence_is_the_phases_composed(logreg):
    model, train, val = logreg.model, logreg.train, logreg.val
    ref = compute_influence(model, train, val, query_indices=QUERIES, solver="exact", damping=0.01,
                            self_influence=True, dtype=torch.float64, chunk_size=64)
    args = check_run_arguments(chunk_size=64, dtype="float64")
    with frozen_module(model):
        problem = bind(model, train, args)
        queries = query_gradients(problem, val, query_indices=QUERIES)
        inverse = fit_inverse(problem, "exact", 0.01)
        solved = solve_queries(inverse, queries.grads, query_batch_size=2)
        scores, _ = influence_scores(problem, solved.s_test)
        self_inf, _ = self_influence_scores(problem, inverse)
    assert queries.indices.tolist() == QUERIES and torch.equal(queries.losses.cpu(), ref.query_losses)
    assert torch.allclose(scores, ref.scores, rtol=1e-8, atol=1e-12)
    assert torch.allclose(self_inf, ref.self_influence, rtol=1e-8, atol=1e-12)
    assert len(solved.chunks) == 2 and solved.batch_size == 2


@pytest.mark.parametrize("world_size", [2, 3])
def test_score_shards_put_together_are_the_whole(logreg, world_size):
    model, train, val = logreg.model, logreg.train, logreg.val
    args = check_run_arguments(chunk_size=32, dtype=torch.float64)
    with frozen_module(model):
        whole = bind(model, train, args)
        inverse = fit_inverse(whole, "ekfac", 0.01)
        s_test = solve_queries(inverse, query_gradients(whole, val, query_indices=QUERIES).grads).s_test
        ref, ref_self = influence_scores(whole, s_test, quadratic=lambda g: inverse.quadratic(g)[0])
        parts, self_parts, bounds = [], [], []
        for r in range(world_size):
            shard = bind(model, train, args, comm=FakeRank(r, world_size))
            s, si = score_shard(shard, s_test, quadratic=lambda g: inverse.quadratic(g)[0])
            parts.append(s)
            self_parts.append(si)
            bounds.append(shard.shard_bounds)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(train)
    # per-example gradients do not depend on the chunk around them (up to float64 round-off of the blocking)
    assert torch.allclose(torch.cat(parts, dim=1), ref, rtol=1e-12, atol=1e-15)
    assert torch.allclose(torch.cat(self_parts), ref_self, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("solver", ["cg", "ekfac"])
def test_two_thread_ranks_give_the_single_process_scores(logreg, solver, monkeypatch):
    model, train, val = logreg.model, logreg.train, logreg.val
    kw = dict(query_indices=QUERIES, solver=solver, damping=0.01, self_influence=True, dtype=torch.float64,
              chunk_size=32)
    ref = compute_influence(model, train, val, **kw)
    results = run_ranks(2, lambda r, comm: compute_influence(copy.deepcopy(model), train, val, comm=comm, **kw),
                        monkeypatch)
    for r, res in enumerate(results):
        assert not isinstance(res, BaseException), res
        assert res.settings["processes"] == 2
        if solver == "ekfac":  # each rank draws its own Fisher labels: another draw of the same estimator
            assert torch.corrcoef(torch.stack([res.scores.flatten(), ref.scores.flatten()]))[0, 1] > 0.99
            continue
        # CG stops at its tolerance: sums in another order move the iterates by far less than that
        tol = 1e-6
        assert torch.allclose(res.scores, ref.scores, rtol=tol, atol=tol * ref.scores.abs().max()), r
        assert torch.allclose(res.self_influence, ref.self_influence, rtol=tol,
                              atol=tol * ref.self_influence.abs().max()), r
    assert torch.equal(results[0].scores, results[1].scores)  # every rank holds the same results


def test_a_failure_on_one_thread_rank_raises_on_both(logreg, monkeypatch):
    model, train, val = logreg.model, logreg.train, logreg.val

    def work(rank: int, comm: Communicator):
        def progress(phase: str, done: int, total: int) -> None:
            if rank == 1 and phase == "solve":
                raise ValueError("broken on rank 1")

        return compute_influence(copy.deepcopy(model), train, val, query_indices=QUERIES, solver="cg", damping=0.01,
                                 dtype=torch.float64, comm=comm, progress=progress)

    r0, r1 = run_ranks(2, work, monkeypatch)
    assert isinstance(r1, ValueError) and str(r1) == "broken on rank 1"
    assert isinstance(r0, PeerFailedError), r0
    assert "rank(s) [1]" in str(r0) and "ValueError: broken on rank 1" in str(r0)


def test_an_agreement_ends_in_a_barrier_on_every_rank_and_none_after_a_failure(monkeypatch):
    """So that no rank leaves (and exits) while a peer's last transfer is in flight (Communicator.settle)."""

    def work(rank: int, comm: Communicator, fail_on: int):
        try:
            with comm.agreement():
                total = comm.all_reduce_sum(torch.ones(3))
                if rank == fail_on:
                    raise ValueError("broken")
        except (ValueError, PeerFailedError) as err:
            return type(err).__name__, comm.barriers
        return float(total.sum()), comm.barriers

    assert run_ranks(2, lambda r, c: work(r, c, fail_on=-1), monkeypatch) == [(6.0, 1), (6.0, 1)]
    assert run_ranks(2, lambda r, c: work(r, c, fail_on=1), monkeypatch) == [("PeerFailedError", 0), ("ValueError", 0)]


def test_queries_are_solved_in_chunks_within_the_memory_budget_by_default(logreg, monkeypatch):
    """With no ``query_batch_size`` the solves take as many queries as keep the solver state within
    ``SOLVE_BYTES``: here a budget of 3 queries' state (650 float64 parameters) gives chunks of 3, recorded,
    and the same scores as one solve of all 8 (CG to its tolerance)."""
    import lightning_influence.pipeline as pipeline

    kw = dict(query_indices=list(range(8)), solver="cg", damping=logreg.damping, dtype=torch.float64)
    whole = compute_influence(logreg.model, logreg.train, logreg.val, **kw)
    assert whole.settings["query_batch_size"] == 8
    monkeypatch.setattr(pipeline, "SOLVE_BYTES", 3 * pipeline.SOLVE_VECTORS_PER_QUERY * 650 * 8)
    chunked = compute_influence(logreg.model, logreg.train, logreg.val, **kw)
    assert chunked.settings["query_batch_size"] == 3
    torch.testing.assert_close(chunked.scores, whole.scores, rtol=1e-5, atol=1e-6 * float(whole.scores.abs().max()))
    assert pipeline.default_query_batch(10, 10**9, 4) == 1  # never 0
