"""Exceptions raised by lightning-influence. Every message names the argument at fault and the fix."""

from __future__ import annotations

__all__ = ["InfluenceConfigError", "InfluenceInterrupted", "InfluenceRuntimeError", "NegativeCurvatureError",
           "ResultsFileError", "SolverDivergedError"]


class InfluenceConfigError(ValueError):
    """A setting or input is invalid. Raised before heavy work wherever possible."""


class InfluenceRuntimeError(RuntimeError):
    """The computation itself failed (non-finite loss or gradients, a solver that cannot converge)."""


class SolverDivergedError(InfluenceRuntimeError):
    """An iterative inverse-HVP solver diverged or produced NaN/inf."""


class NegativeCurvatureError(SolverDivergedError):
    """``H + λI`` has a negative eigenvalue (the weights are not at a minimum): LiSSA would diverge and the
    influence quadratic has no minimum. The message names the damping that fixes it."""


class ResultsFileError(InfluenceRuntimeError):
    """A results file could not be written (full disk, file-size limit, no permission) or read back (empty,
    truncated, corrupted). The message names the file and the cause; a failed write leaves the previous
    file untouched."""


class InfluenceInterrupted(KeyboardInterrupt):
    """Ctrl+C during the influence phase. :class:`~lightning_influence.integration.callback.InfluenceCallback` stops
    the influence computation only (training, weights and checkpoints are kept) and records it as its
    ``error``; a second Ctrl+C is handled as usual."""
