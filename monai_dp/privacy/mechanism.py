"""The step of DP training as accounted: the Poisson-sampled Gaussian mechanism, its validation, and the one
search for the largest number of steps that fits a budget.

- :class:`Mechanism` ``(noise_multiplier, sample_rate, steps, group_size=1)``: ``steps`` steps with noise
  multiplier σ and Poisson sample rate q, protecting a group of ``group_size`` records (a patient with several
  records under record-level sampling). The composition functions (:mod:`monai_dp.privacy.pld`) and the ledger
  take these.
- An accountant's history holds :data:`Entry` triples ``(σ, q, n)``, Opacus' history format (one record:
  no group size); :meth:`Mechanism.entry` and :meth:`Mechanism.from_entry` convert between the two.
- :func:`largest_passing`: exponential search then bisection over a step count, used by every accountant,
  :func:`~monai_dp.privacy.pld.max_steps_within_budget` and the ledger's plan.

This module imports nothing but the validation helpers: every other module of the package may import it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from monai_dp.utils.validation import error_message

__all__ = ["Entry", "History", "Mechanism", "check_count", "check_entry", "largest_passing", "merge_entry"]

Entry = tuple[float, float, int]
History = tuple[Entry, ...]


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(error_message(name, "an int", type(value).__name__))
    if not value >= minimum:
        raise ValueError(error_message(name, f"an int >= {minimum}", value))
    return int(value)


def check_entry(noise_multiplier: Any, sample_rate: Any, num_steps: Any, steps_name: str = "num_steps",
                min_steps: int = 1) -> Entry:
    """Validated ``(σ, q, n)`` as plain ``(float, float, int)``: σ finite and >= 0, q in (0, 1]."""
    for name, value in (("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(error_message(name, "a number", type(value).__name__))
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(error_message("noise_multiplier", "a finite number >= 0", noise_multiplier))
    if not 0 < sample_rate <= 1:
        raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
    return float(noise_multiplier), float(sample_rate), check_count(steps_name, num_steps, min_steps)


class Mechanism(NamedTuple):
    """``steps`` steps of the Poisson-sampled Gaussian mechanism, protecting a group of ``group_size`` records."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    group_size: int = 1

    @classmethod
    def checked(cls, m: Mechanism | Sequence, min_steps: int = 0) -> Mechanism:
        """``m`` (a :class:`Mechanism` or a sequence of its fields) validated, with plain float and int fields."""
        m = cls(*m)
        sigma, q, n = check_entry(m.noise_multiplier, m.sample_rate, m.steps, "steps", min_steps)
        return cls(sigma, q, n, check_count("group_size", m.group_size, 1))

    @classmethod
    def from_entry(cls, entry: Entry) -> Mechanism:
        """The single-record mechanism of an accountant's history entry ``(σ, q, n)``."""
        sigma, q, n = entry
        return cls(sigma, q, n)

    @property
    def entry(self) -> Entry:
        """``(σ, q, n)``, an accountant's history entry; only for a group of one record."""
        if self.group_size != 1:
            raise ValueError(error_message("group_size", "1 for an accountant's history entry", self.group_size))
        return self.noise_multiplier, self.sample_rate, self.steps


def merge_entry(history: list[Entry], entry: Entry) -> None:
    """Append ``entry`` to ``history``, adding its steps to the last entry when (σ, q) are equal; skip 0 steps."""
    if entry[2] == 0:
        return
    if history and history[-1][:2] == entry[:2]:
        history[-1] = (entry[0], entry[1], history[-1][2] + entry[2])
    else:
        history.append(entry)


def largest_passing(ok: Callable[[int], bool], limit: int, start: int = 0) -> int:
    """Largest ``k`` in ``[0, limit]`` with ``ok(k)``, for an ``ok`` that is true up to a boundary, then false.

    ``ok(0)`` is taken as true and never asked (callers that need it check it first). From ``start`` the search
    gallops, in steps 1, 2, 4, ..., up while ``ok`` holds or down while it fails, then bisects between the last
    passing and the first failing count: about ``2 log2`` of the distance from ``start`` to the boundary
    queries, one query when ``start`` is already the answer at ``limit``. ``start = 0`` is the search for a
    count from scratch; ``start = limit`` checks a count believed to fit and walks down only if it does not.
    """
    limit = check_count("limit", limit, 0)
    start = min(check_count("start", start, 0), limit)
    if start == 0 or ok(start):
        lo, hi, step = start, None, 1  # gallop up: ok(lo) holds
        while hi is None:
            if lo == limit:
                return limit
            probe = min(start + step, limit)
            if ok(probe):
                lo = probe
            else:
                hi = probe
            step *= 2
    else:
        lo, hi, step = None, start, 1  # gallop down: ok(hi) fails
        while lo is None:
            probe = max(start - step, 0)
            if probe == 0 or ok(probe):
                lo = probe
            else:
                hi = probe
            step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
