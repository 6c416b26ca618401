"""Type checks shared by settings, diagnostics and reports. Python's ``bool`` is an ``int``; here it is never
a count or a measurement, so every check of "a number" excludes it."""

from __future__ import annotations

from typing import Any

from .errors import InfluenceConfigError

__all__ = ["is_int", "is_real", "check_positive_int"]


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and inf included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise :class:`InfluenceConfigError` naming ``name`` unless ``value`` is an integer ``≥ 1`` (or
    ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if not is_int(value) or value < 1:
        raise InfluenceConfigError(f"{name}={value!r} must be a positive integer{' or None' if allow_none else ''}.")
