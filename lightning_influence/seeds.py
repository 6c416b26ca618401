"""Seeds of every random stream, derived from one user seed in one place.

A computation draws several independent streams from the same user seed: LiSSA's repeats, each pass of
the Kronecker factors, the probes of a spectral estimate, and in a data-parallel run each process's part
of a minibatch. Each stream is named by a tuple of integers, and :func:`derive_seed` mixes the seed with
that tuple (SplitMix64 finalisation of a running hash), so that

* the same seed and components always give the same stream (results are reproducible);
* streams with different components are unrelated (no stream is a shifted copy of another);
* :func:`rank_seed` gives each process of a data-parallel computation its own stream of the same name.

Example:
    >>> derive_seed(0, 1) == derive_seed(0, 1) and derive_seed(0, 1) != derive_seed(0, 2)
    True
    >>> rank_seed(5, rank=0) != rank_seed(5, rank=1)
    True
"""

from __future__ import annotations

__all__ = ["derive_seed", "rank_seed", "Stream"]

_MASK = (1 << 64) - 1


class Stream:
    """Names of the random streams (first component of :func:`derive_seed`), one per use."""

    REPEAT = 1  #: LiSSA repeat ``r``: its minibatch stream
    SETUP = 2  #: a solver's setup estimates (scale, trace, sketch)
    FISHER_PASS = 3  #: Fisher draws of a Kronecker pass ``(pass, sample)``
    SUBSAMPLE = 4  #: examples drawn for an estimate on a subset
    RESTART = 5  #: a restart of an iterative estimate
    RANK = 6  #: a process's own stream (:func:`rank_seed`)


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_seed(seed: int, *components: int) -> int:
    """A seed in ``[0, 2**62)`` for the stream named by ``components`` under the user's ``seed``; a pure
    function of its arguments."""
    h = _mix(int(seed) & _MASK)
    for c in components:
        h = _mix(h ^ (int(c) & _MASK))
    return h >> 2


def rank_seed(seed: int, rank: int) -> int:
    """``seed`` for process ``rank`` of a data-parallel computation (rank 0 keeps ``seed`` itself, so one
    process draws exactly what it would alone)."""
    return int(seed) if int(rank) == 0 else derive_seed(seed, Stream.RANK, rank)
