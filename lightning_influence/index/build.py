"""Building an :class:`~lightning_influence.index.InfluenceIndex`: one streamed pass over the training
gradients that stores, per training example ``i``, a vector from which ``I_up,loss(z_i, z_q) =
−∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_i)`` follows for any later query by one dot product.

Representations (``D`` numbers per example):

* ``"exact"`` (``D = P``): the preconditioned gradient ``u_i = (H + λI)⁻¹ g_i``, so that
  ``score = −g_q · u_i`` with nothing else needed at query time (no solver, no training data: the index
  answers in another process). ``(H + λI)⁻¹`` is symmetric, so this equals
  :func:`~lightning_influence.pipeline.compute_influence`'s ``−((H + λI)⁻¹ g_q) · g_i`` to round-off for a
  closed-form or direct inverse (EK-FAC, K-FAC, Arnoldi, exact) and to the solver's tolerance for an
  iterative one. Cost: one application per training example; for an iterative solver (CG, LiSSA) that is
  ``N`` solves, like ``self_influence=True``.
* ``"compressed"`` (``D = k``, the ``projection_dim``): ``v_i = M_train g_i`` and at query time
  ``score ≈ −(M_query g_q) · v_i`` with ``R [k, P]`` a seeded Gaussian projection
  (:mod:`~lightning_influence.index.projection`, ``E[RᵀR] = I``, so the estimate is unbiased):

  - *whitened* (a factored inverse: ``apply_inverse_sqrt``; the exact solver: the eigendecomposition of
    its damped Hessian): ``M_train = M_query = R (H + λI)^{-1/2}``, i.e. both sides whitened, then
    projected. The estimate's error is that of a JL inner product of the whitened vectors
    (variance ``(‖w_q‖²‖w_i‖² + (w_q·w_i)²)/k``).
  - *plain* (iterative solvers): ``M_query = R``, ``M_train = R (H + λI)⁻¹`` (``k`` solves, not ``N``).
    Noisier (the two sides are not in the same geometry): prefer a factored solver for a compressed index.

  The ``[k, P]`` matrices are computed in blocks of rows and kept on disk beside the rows (``k·P`` numbers
  each), so that a query needs neither the seed's generator nor the inverse.
  - *sketch* (a K-FAC/EK-FAC inverse; :mod:`~lightning_influence.index.sketch`): ``v_i = S c(g_i)``, the
    gradient whitened in the inverse's eigenbasis then CountSketched, and the same map for the queries. Nothing
    of size ``k·P`` exists: the factors (megabytes) are saved for the queries and ``S`` is redrawn from the
    seed. The same estimator as *whitened*, for models whose ``[k, P]`` matrix would not fit.

  ``projection="auto"`` (the default) picks *sketch* when the inverse is Kronecker-factored, else the Gaussian
  matrix (*whitened* or *plain*). On the small CNN (EK-FAC, 100 queries) the two agree with the exact scores
  alike (Pearson 0.914 / 0.972 / 0.996 sketched at k = 256 / 1,024 / 4,096 against 0.909 / 0.975 / 0.994), and
  the sketch is 2-16× smaller on disk and faster to build (``benchmarks/README.md``).

Under data parallelism (``problem.comm`` over ``W`` processes) every process writes the rows of its own
shard of the training set; an iterative inverse's solves run their Hessian-vector products across the
processes, so there every process walks the whole training set in the same chunks (as self-influence
does) and keeps its shard's rows. The folder must be shared by the processes (one filesystem).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..checks import is_int
from ..curvature.damping import AutoDamping, resolve_damping
from ..data import Collate
from ..distributed import Communicator, local_communicator, shard_bounds
from ..errors import InfluenceConfigError
from ..guards import preserved_rng
from ..objective import LossFn
from ..problem import InfluenceProblem
from ..record import DataFacts, RunRecord, RunSettings
from ..solvers import FactoredInverse, InverseHVP, SolverSettings, resolve_solver
from ..solvers.exact import ExactSolver
from .fingerprint import fingerprint
from .projection import ROW_BLOCK, projection_blocks
from .sketch import CountSketch, KroneckerWhitening
from .storage import FORMAT, FORMAT_VERSION, META, RowWriter, write_meta

if TYPE_CHECKING:  # pragma: no cover
    from .index import InfluenceIndex

__all__ = ["DENSE_PROJECTION_BYTES", "PROJECTIONS", "Projection", "REPRESENTATIONS", "Representation", "build_index",
           "build_index_for_run", "check_index_arguments"]

Representation = Literal["exact", "compressed"]
REPRESENTATIONS = ("exact", "compressed")
Projection = Literal["auto", "gaussian", "sketch"]
PROJECTIONS = ("auto", "gaussian", "sketch")
#: above this size of a dense ``[k, P]`` projection, ``solver="auto"`` builds a compressed index with EK-FAC
#: (whose factors the sketch needs) instead of an iterative solver (:func:`build_index_for_run`)
DENSE_PROJECTION_BYTES = 256 << 20
#: the whitening factors of a sketched index, beside its rows
WHITENING_FILE = "whitening.pt"
#: the default ``projection_dim`` of a compressed index
DEFAULT_PROJECTION_DIM = 1024
Progress = Optional[Callable[[int, int], None]]


def check_index_arguments(representation: Any, projection_dim: Any, seed: Any, projection: Any = "auto") -> None:
    """Raise :class:`InfluenceConfigError` naming the first bad argument and its fix."""
    if projection not in PROJECTIONS:
        raise InfluenceConfigError(
            f"projection={projection!r} is not one of {list(PROJECTIONS)}: 'gaussian' stores a dense [k, P] matrix "
            "(small models, any solver), 'sketch' a whitened CountSketch (K-FAC/EK-FAC inverses, any size), 'auto' "
            "picks by size.")
    if representation not in REPRESENTATIONS:
        raise InfluenceConfigError(
            f"representation={representation!r} is not one of {list(REPRESENTATIONS)}: 'exact' stores each training "
            "example's preconditioned gradient (P numbers, scores to round-off), 'compressed' a random projection "
            "of it (projection_dim numbers, scores to a measured correlation).")
    if representation == "compressed" and (not is_int(projection_dim) or projection_dim < 1):
        raise InfluenceConfigError(
            f"projection_dim={projection_dim!r} must be a positive integer (numbers stored per training example of a "
            f"compressed index; e.g. {DEFAULT_PROJECTION_DIM}; larger is more accurate).")
    if not is_int(seed):
        raise InfluenceConfigError(f"seed={seed!r} must be an integer (the seed of the random projection).")


def _cheap_solves(inverse: InverseHVP) -> bool:
    """Whether applying the inverse is local and cheap (closed form or a factorisation): no HVPs, no
    collectives."""
    return isinstance(inverse, (FactoredInverse, ExactSolver))


def _whitener(inverse: InverseHVP) -> Optional[Callable[[Tensor], Tensor]]:
    """``V ↦ V (H + λI)^{-1/2}`` (rows; the matrix is symmetric) where the inverse has a square root:
    a factored inverse's own, or the exact solver's from the eigendecomposition of its damped Hessian
    (when positive definite); else ``None``."""
    if isinstance(inverse, FactoredInverse):
        return inverse.apply_inverse_sqrt
    if isinstance(inverse, ExactSolver):
        a = inverse.hessian + inverse.damping * torch.eye(inverse.hessian.shape[0], dtype=inverse.hessian.dtype,
                                                          device=inverse.hessian.device)
        evals, evecs = torch.linalg.eigh(a)
        if float(evals[0]) <= 0:
            return None
        root = (evecs * evals.rsqrt()) @ evecs.T
        return lambda v: v @ root
    return None


def _solve(inverse: InverseHVP, rhs: Tensor, batch: int) -> Tensor:
    """``(H + λI)⁻¹`` applied to every row of ``rhs``, ``batch`` rows per solve."""
    return torch.cat([inverse.solve(rhs[s : s + batch]).solution for s in range(0, rhs.shape[0], batch)])


def _self_influence(inverse: InverseHVP, g: Tensor, u: Optional[Tensor]) -> Optional[Tensor]:
    """``−g_iᵀ (H + λI)⁻¹ g_i`` per row when it costs no solve (or ``u`` holds the solved rows)."""
    if u is not None:
        return -(g * u).sum(dim=1)
    if isinstance(inverse, FactoredInverse):
        return -inverse.quadratic(g)[0]
    if isinstance(inverse, ExactSolver):
        return -(g * inverse.solve(g).solution).sum(dim=1)
    return None


def _matrices(problem: InfluenceProblem, inverse: InverseHVP, dim: int, seed: int, batch: int
              ) -> Tuple[str, Tensor, Tensor]:
    """``(kind, M_query, M_train)`` of a compressed index (see the module docstring), ``[k, P]`` each,
    computed ``ROW_BLOCK`` rows at a time."""
    whiten = _whitener(inverse)
    query_parts: List[Tensor] = []
    train_parts: List[Tensor] = []
    for _, block in projection_blocks(dim, problem.num_params, seed, problem.dtype, problem.device):
        if whiten is not None:
            query_parts.append(whiten(block))
        else:
            query_parts.append(block)
            train_parts.append(_solve(inverse, block, batch))
    m_query = torch.cat(query_parts)
    return ("whitened", m_query, m_query) if whiten is not None else ("plain", m_query, torch.cat(train_parts))


def _pick_projection(projection: str, inverse: InverseHVP, dim: int, num_params: int, itemsize: int
                     ) -> Optional[KroneckerWhitening]:
    """The whitening of a sketched index, or ``None`` for the Gaussian matrix (see the module docstring).

    Raises:
        InfluenceConfigError: ``projection="sketch"`` with an inverse that has no Kronecker factors."""
    whitening = KroneckerWhitening.of(inverse) if projection != "gaussian" else None
    if projection == "sketch" and whitening is None:
        raise InfluenceConfigError(
            f"projection='sketch' needs a Kronecker-factored inverse (solver='ekfac' or 'kfac'), got "
            f"{type(inverse).__name__}. Fix: pass solver='ekfac', or projection='gaussian' (a dense "
            f"[{dim}, {num_params}] matrix, {dim * num_params * itemsize / 2**20:.0f} MiB).")
    return whitening


def _training_chunks(problem: InfluenceProblem, whole: bool) -> Iterator[Tuple[int, Tensor]]:
    """``(start, ∇L [B, P])``: this process's shard (``whole=False``) or the whole training set in the same
    chunks on every process (``whole=True``, for solves whose products span the processes)."""
    if not whole:
        for start, _, g in problem.grad_chunks():
            yield start, g
        return
    for start, batch in problem.train.chunks(problem.grad_chunk_size):
        yield start, problem.example_grads(batch, start)


def _sketch_chunks(problem: InfluenceProblem, whitening: KroneckerWhitening, sketch: CountSketch
                   ) -> Iterator[Tuple[int, Tensor, Tensor]]:
    """``(start, S c(∇L) [B, k], −‖c(∇L)‖² [B])`` over this process's shard: the sketched whitened gradients and
    the self-influence, from the captured layer factors, never the formed gradients
    (:meth:`KroneckerWhitening.batch_sketch`)."""
    lo = problem.shard_bounds[0]
    for start, batch in problem.shard.chunks(problem.grad_chunk_size):
        z, norms = whitening.batch_sketch(problem.objective, batch, sketch, lo + start)
        yield lo + start, z, -norms


def _record(problem: InfluenceProblem, inverse: InverseHVP, settings: Optional[SolverSettings], solve_batch: int,
            extra: Optional[Dict[str, Any]] = None) -> RunRecord:
    objective = problem.objective
    loss = "influence_loss" if objective.uses_hook else getattr(objective.loss_fn, "__name__", "loss_fn")
    solver = dict(settings.composed().to_dict()) if settings is not None else {"solver": type(inverse).__name__}
    return RunRecord(
        solver={**solver, **inverse.facts, **(extra or {})},
        damping=inverse.choice,
        run=RunSettings(dtype=str(problem.dtype).replace("torch.", ""), chunk_size=problem.chunk_size,
                        grad_chunk_size=problem.grad_chunk_size, query_batch_size=int(solve_batch), loss=loss,
                        differentiation=str(objective.differentiation)),
        data=DataFacts(num_train_total=problem.num_examples, num_queries=0, num_params=objective.num_params,
                       params=tuple(objective.param_names), processes=problem.comm.world_size,
                       device=str(objective.device)),
    )


def build_index(
    problem: InfluenceProblem,
    inverse: InverseHVP,
    path: Union[str, "os.PathLike[str]"],
    *,
    representation: Representation = "exact",
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    seed: int = 0,
    projection: Projection = "auto",
    solve_batch: Optional[int] = None,
    settings: Optional[SolverSettings] = None,
    record: Optional[RunRecord] = None,
    progress: Progress = None,
) -> "InfluenceIndex":
    """Build the index of ``problem``'s training set under the fitted ``inverse`` into the folder ``path``
    (created; an index already there is replaced) in one streamed pass of per-example gradients, and
    return it (loaded from the folder, as :meth:`InfluenceIndex.load` would). Call inside
    :func:`~lightning_influence.pipeline.frozen_module`, with ``problem`` from
    :func:`~lightning_influence.pipeline.bind` and ``inverse`` from
    :func:`~lightning_influence.pipeline.fit_inverse` (or ``settings.fit``). Every process of
    ``problem.comm`` makes the same call.

    Args:
        representation: ``"exact"`` (``P`` numbers per example) or ``"compressed"`` (``projection_dim``);
            see the module docstring for what each stores and costs.
        projection_dim: ``k``, the projection's size (compressed only).
        seed: the projection's seed; the same seed gives the same index.
        projection: ``"gaussian"``, ``"sketch"`` or ``"auto"`` (compressed only; see the module docstring).
        solve_batch: right-hand sides per solve of an iterative inverse (default: the
            :func:`~lightning_influence.pipeline.default_query_batch` budget for a gradient chunk).
        settings: the solver's settings, recorded (default: the inverse's class name).
        record: the run record to keep instead of the one made from ``problem`` and ``inverse``.
        progress: optional ``progress(examples_done, examples_in_shard)``.

    Memory: one chunk of gradients ``[problem.grad_chunk_size, P]`` and its representation; for a
    compressed index also its ``[k, P]`` matrices (one when whitened, two when plain; the random ``R`` itself
    is drawn ``ROW_BLOCK`` rows at a time and never held whole), or for a sketched one the inverse's factors
    and ``2·P`` bucket numbers and signs. Disk: ``N·D`` numbers of ``problem.dtype``, plus ``k·P``
    (whitened) or ``2·k·P`` (plain) for a Gaussian compressed index, or the factors for a sketched one.
    """
    from ..pipeline import default_query_batch  # the phases import nothing of the index
    from .index import InfluenceIndex

    check_index_arguments(representation, projection_dim, seed, projection)
    folder = os.path.abspath(os.fspath(path))
    comm = problem.comm
    rank, world = comm.rank, comm.world_size
    n, p = problem.num_examples, problem.num_params
    lo, hi = problem.shard_bounds
    batch = int(solve_batch or default_query_batch(problem.grad_chunk_size, p, problem.theta.element_size()))
    timings: Dict[str, float] = {}
    t_start = time.perf_counter()
    compressed = representation == "compressed"
    dim = int(projection_dim) if compressed else p
    with comm.agreement():
        os.makedirs(folder, exist_ok=True)
        if rank == 0 and os.path.exists(os.path.join(folder, META)):
            os.unlink(os.path.join(folder, META))  # the old index stops being readable before any file changes
        projection_meta: Optional[Dict[str, Any]] = None
        m_train: Optional[Tensor] = None
        whitening = (_pick_projection(projection, inverse, dim, p, problem.theta.element_size())
                     if compressed else None)
        sketch: Optional[CountSketch] = None
        if whitening is not None:
            t0 = time.perf_counter()
            sketch = CountSketch(dim, p, int(seed))
            if rank == 0:
                torch.save(whitening.state(), os.path.join(folder, WHITENING_FILE))
            projection_meta = {"dim": dim, "seed": int(seed), "kind": "sketch", "files": {"whitening": WHITENING_FILE},
                               "factor_numbers": whitening.numel}
            timings["projection"] = time.perf_counter() - t0
        elif compressed:
            t0 = time.perf_counter()
            kind, m_query, m_train = _matrices(problem, inverse, dim, int(seed), batch)
            files = {"query": "projection-query.bin"}
            if kind == "plain":
                files["train"] = "projection-train.bin"
            if rank == 0:
                for role, name in files.items():
                    w = RowWriter(os.path.join(folder, name), dim, p, problem.dtype)
                    w.write(0, m_query if role == "query" else m_train)
                    w.commit()
            projection_meta = {"dim": dim, "seed": int(seed), "kind": kind, "row_block": ROW_BLOCK, "files": files}
            del m_query
            timings["projection"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cheap = _cheap_solves(inverse)
        rows = RowWriter(os.path.join(folder, f"rows-{rank}.bin"), hi - lo, dim, problem.dtype)
        selfs: Optional[RowWriter] = None
        wants_self = not compressed or cheap  # self-influence for free: solved rows, or a cheap quadratic
        if wants_self:
            selfs = RowWriter(os.path.join(folder, f"self-{rank}.bin"), hi - lo, 0, problem.dtype)
        done = 0
        try:
            chunks = (_sketch_chunks(problem, whitening, sketch) if sketch is not None else
                      ((s, g, None) for s, g in
                       _training_chunks(problem, whole=comm.distributed and not cheap and not compressed)))
            for start, g, sketched_self in chunks:
                a, b = max(start, lo), min(start + g.shape[0], hi)
                if sketched_self is not None:  # g: the sketch of this shard's whitened gradients
                    rep, si = g, sketched_self
                elif compressed:
                    keep = g[a - start : b - start]
                    rep = keep @ m_train.T
                    si = _self_influence(inverse, keep, None)
                else:
                    u = _solve(inverse, g, batch)[a - start : b - start]  # every process solves the same rows
                    keep = g[a - start : b - start]
                    rep, si = u, _self_influence(inverse, keep, u)
                if b > a:
                    rows.write(a - lo, rep)
                    if selfs is not None and si is not None:
                        selfs.write(a - lo, si)
                    done += b - a
                    if progress:
                        progress(done, hi - lo)
            rows.commit()
            if selfs is not None:
                selfs.commit()
        except BaseException:
            rows.abort()
            if selfs is not None:
                selfs.abort()
            raise
        timings["rows"] = time.perf_counter() - t0
        comm.all_true(True)  # every shard is on disk
        if rank == 0:
            rec = record or _record(problem, inverse, settings, batch)
            shards = []
            for r in range(world):
                a, b = shard_bounds(n, r, world)
                shards.append({"rank": r, "start": a, "stop": b, "rows": f"rows-{r}.bin",
                               "self_influence": f"self-{r}.bin" if wants_self else None})
            timings["total"] = time.perf_counter() - t_start
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION, "representation": representation, "dim": dim,
                "num_examples": n, "num_params": p, "dtype": str(problem.dtype).replace("torch.", ""),
                "projection": projection_meta, "shards": shards, "train_indices": problem.train.indices.tolist(),
                "model": fingerprint(problem.objective.module, problem.objective.param_names),
                "loss": rec.run.loss if rec.run is not None else None,
                "solver": str(rec.solver.get("solver", type(inverse).__name__)), "damping": inverse.damping,
                "record": rec.to_dict(), "timings": timings,
            }
            write_meta(folder, meta)
        comm.all_true(True)  # the metadata is on disk
    return InfluenceIndex.load(folder)


def build_index_for_run(
    model: nn.Module,
    train_dataset: Dataset,
    path: Union[str, "os.PathLike[str]"],
    *,
    representation: Representation = "exact",
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    seed: int = 0,
    projection: Projection = "auto",
    loss_fn: Optional[LossFn] = None,
    params: Optional[Union[str, Sequence[str]]] = None,
    solver: Union[str, SolverSettings] = "auto",
    damping: Union[float, str, AutoDamping] = "auto",
    collate_fn: Optional[Collate] = None,
    chunk_size: int = 256,
    grad_chunk_size: Optional[int] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
    comm: Optional[Communicator] = None,
    train_indices: Optional[Sequence[int]] = None,
    progress: Progress = None,
) -> "InfluenceIndex":
    """Fit the solver to the trained ``model`` and build its index in one call (what the callback's
    ``build_index=True`` runs at the end of training; :func:`compute_influence`'s arguments of the same
    names mean the same). The model is not modified and the random states are restored.

    ``solver="auto"`` picks for ``N`` right-hand sides with an exact representation (each training
    gradient is solved) and for ``projection_dim`` with a compressed one; a compressed index whose dense
    ``[k, P]`` projection would exceed :data:`DENSE_PROJECTION_BYTES` takes EK-FAC (unless
    ``projection="gaussian"``), whose factors the sketch needs. The choice and its reason are recorded.

    Returns:
        the :class:`InfluenceIndex` at ``path``; ``index.explain(model, dataset, indices)`` answers queries.
    """
    from ..pipeline import bind, default_query_batch, fit_inverse, frozen_module, needs_hvp
    from ..solvers.auto import Choice, chosen, record_of
    from ..solvers.ekfac import EKFACSettings
    from ..validation import check_run_arguments

    check_index_arguments(representation, projection_dim, seed, projection)
    args = check_run_arguments(params=params, chunk_size=chunk_size, grad_chunk_size=grad_chunk_size, dtype=dtype,
                               damping=damping)
    settings = resolve_solver(solver)
    comm = local_communicator(comm)
    with preserved_rng(), frozen_module(model):
        problem = bind(model, train_dataset, args, loss_fn=loss_fn, collate_fn=collate_fn, comm=comm,
                       need_hvp=needs_hvp(settings), train_indices=train_indices)
        rhs = problem.num_examples if representation == "exact" else int(projection_dim)
        choice = chosen(settings, problem, rhs, False)
        dense = int(projection_dim) * problem.num_params * problem.theta.element_size()
        if (choice is not None and representation == "compressed" and projection != "gaussian"
                and dense > DENSE_PROJECTION_BYTES and choice.name not in ("ekfac", "kfac")):
            # the dense [k, P] matrix would not fit: the sketch, which needs Kronecker factors
            choice = Choice(EKFACSettings(), f"a compressed index of {problem.num_params:,} parameters: the dense "
                                             f"[{int(projection_dim)}, P] projection would take {dense / 2**20:,.0f} "
                                             "MiB, the sketch needs Kronecker factors")
        if choice is not None:
            settings = choice.settings
        settings.check_size(problem.num_params, args.dtype)
        inverse = fit_inverse(problem, settings, resolve_damping(damping))
        batch = default_query_batch(problem.grad_chunk_size, problem.num_params, problem.theta.element_size())
        rec = _record(problem, inverse, settings, batch, record_of(choice))
        return build_index(problem, inverse, path, representation=representation, projection_dim=projection_dim,
                           seed=seed, projection=projection, solve_batch=batch, settings=settings, record=rec,
                           progress=progress)
