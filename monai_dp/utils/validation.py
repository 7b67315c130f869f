"""Argument checks that raise errors in one template.

Every message reads: `` `<arg>` must be <constraint>, got <value!r>. `` followed by one
sentence of fix where one exists. Checks are written as ``not x > 0`` so that NaN fails too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = [
    "check_choice",
    "check_non_negative",
    "check_open_unit_interval",
    "check_positive",
    "check_positive_int",
    "check_sample_rate",
    "check_type",
    "error_message",
    "is_integer",
    "is_real",
]


def error_message(name: str, constraint: str, value: Any, fix: str | None = None) -> str:
    """Format the project's error message: name the argument, the constraint, the value and the fix.

    A NumPy scalar is shown as the Python number it holds (``nan``, not ``np.float32(nan)``).
    """
    if isinstance(value, np.generic):
        value = value.item()
    msg = f"`{name}` must be {constraint}, got {value!r}."
    if fix:
        msg += f" {fix}"
    return msg


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: Python or NumPy ints and floats (``numbers.Real``), not a bool.

    NaN is a real number here; the range checks below refuse it (``not x > 0``).
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer: Python or NumPy ints (``numbers.Integral``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive(name: str, value: Any, fix: str | None = None) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise ``ValueError``/``TypeError``."""
    if not is_real(value):
        raise TypeError(error_message(name, "a number", type(value).__name__, fix))
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(error_message(name, "a finite number > 0", value, fix))
    return float(value)


def check_non_negative(name: str, value: Any, fix: str | None = None) -> float:
    """Return ``float(value)`` if it is a finite number >= 0."""
    if not is_real(value):
        raise TypeError(error_message(name, "a number", type(value).__name__, fix))
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(error_message(name, "a finite number >= 0", value, fix))
    return float(value)


def check_open_unit_interval(name: str, value: Any, fix: str | None = None) -> float:
    """Return ``float(value)`` if 0 < value < 1."""
    if not is_real(value):
        raise TypeError(error_message(name, "a number", type(value).__name__, fix))
    if not (0 < value < 1):
        raise ValueError(error_message(name, "in (0, 1)", value, fix))
    return float(value)


def check_sample_rate(value: Any, name: str = "sample_rate", fix: str | None = None) -> float:
    """Return ``float(value)`` if it is a Poisson sample rate: a number with 0 < value <= 1.

    Raises ``TypeError`` for a non-number (bools too) and ``ValueError`` otherwise (NaN too), naming ``name``.
    """
    if not is_real(value):
        raise TypeError(error_message(name, "a number", type(value).__name__, fix))
    if not 0 < value <= 1:
        raise ValueError(error_message(name, "in (0, 1]", value, fix))
    return float(value)


def check_positive_int(name: str, value: Any, fix: str | None = None) -> int:
    """Return ``int(value)`` if it is an int >= 1 (NumPy ints accepted, bools refused)."""
    if not is_integer(value):
        raise TypeError(error_message(name, "an int", type(value).__name__, fix))
    if not value >= 1:
        raise ValueError(error_message(name, "an int >= 1", value, fix))
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str], fix: str | None = None) -> str:
    """Return ``value`` lower-cased if it is one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(error_message(name, f"one of {list(choices)}", type(value).__name__, fix))
    low = value.lower()
    if low not in choices:
        raise ValueError(error_message(name, f"one of {list(choices)}", value, fix))
    return low


def check_type(name: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """Return ``value`` if it is an instance of ``types``, else raise ``TypeError`` naming ``what``."""
    if not isinstance(value, types):
        raise TypeError(error_message(name, what, type(value).__name__))
    return value
