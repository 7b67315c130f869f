"""Privacy accountants behind one small interface.

Each accountant records the history of the sampled Gaussian mechanism, ``(noise_multiplier,
sample_rate, num_steps)`` entries, and converts it to ε at a given δ:

- ``"prv"``: Opacus' privacy random variable accountant (Gopi et al. 2021); returns the upper end of its
  error bracket, so the reported ε is a bound. Tight: close to the exact privacy loss distribution.
- ``"rdp"``: Opacus' Rényi DP accountant (Mironov 2017); a valid but looser bound.
- ``"gdp"``: Gaussian DP via the central limit theorem (Bu et al. 2020). It is an *asymptotic
  approximation*, not a bound: it can under-report ε for few steps or large sample rates. Opacus'
  ``GaussianAccountant`` reads only the last history entry; here every entry is composed.

The step count is counted here, from the history (Opacus' ``len(accountant)`` is not the step count).
This module imports neither ignite nor ``torch.nn``.
"""

from __future__ import annotations

import math
from functools import lru_cache

from monai_dp.utils.validation import check_choice, check_open_unit_interval, check_positive_int, error_message

__all__ = ["ACCOUNTANTS", "DPAccountant", "RDPAccountant", "PRVAccountant", "GDPAccountant", "create_accountant"]

ACCOUNTANTS = ("rdp", "prv", "gdp")
PRV_EPS_ERROR = 0.01

History = tuple[tuple[float, float, int], ...]


def _check_mechanism(noise_multiplier: float, sample_rate: float, num_steps: int) -> tuple[float, float, int]:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise TypeError(error_message("noise_multiplier", "a number", type(noise_multiplier).__name__))
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(error_message("noise_multiplier", "a finite number >= 0", noise_multiplier))
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise TypeError(error_message("sample_rate", "a number", type(sample_rate).__name__))
    if not 0 < sample_rate <= 1:
        raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
    check_positive_int("num_steps", num_steps)
    return float(noise_multiplier), float(sample_rate), int(num_steps)


def _merge(history: list[tuple[float, float, int]], entry: tuple[float, float, int]) -> None:
    if history and history[-1][:2] == entry[:2]:
        history[-1] = (entry[0], entry[1], history[-1][2] + entry[2])
    else:
        history.append(entry)


@lru_cache(maxsize=4096)
def _epsilon(name: str, history: History, delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if name == "gdp":
        return _gdp_epsilon(history, delta)
    from opacus.accountants import PRVAccountant as _PRV
    from opacus.accountants import RDPAccountant as _RDP

    if name == "rdp":
        acc = _RDP()
        acc.history = list(history)
        return float(acc.get_epsilon(delta))
    acc = _PRV()
    acc.history = list(history)
    return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def _gdp_mu(history: History) -> float:
    return math.sqrt(sum(q * q * n * math.expm1(1.0 / (s * s)) for s, q, n in history))


def _gdp_epsilon(history: History, delta: float) -> float:
    """ε of μ-GDP at δ: solve δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) for ε (monotone decreasing in ε)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = _gdp_mu(history)
    if math.isinf(mu):
        return math.inf

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    if delta_of(0.0) <= delta:
        return 0.0
    hi = 1.0
    while delta_of(hi) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: delta_of(e) - delta, 0.0, hi, xtol=1e-10))


class DPAccountant:
    """Base accountant: a merged history of sampled Gaussian mechanism steps and its ε."""

    name = ""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps of the sampled Gaussian mechanism (σ, q)."""
        _merge(self.history, _check_mechanism(noise_multiplier, sample_rate, num_steps))

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 with no steps, ``inf`` if a step had σ = 0)."""
        delta = check_open_unit_interval("delta", delta)
        return _epsilon(self.name, tuple(self.history), delta)

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, extra_steps: int) -> float:
        """ε if ``extra_steps`` more steps of (σ, q) were taken; the accountant is not changed."""
        delta = check_open_unit_interval("delta", delta)
        history = list(self.history)
        if extra_steps:
            _merge(history, _check_mechanism(noise_multiplier, sample_rate, extra_steps))
        return _epsilon(self.name, tuple(history), delta)

    def max_extra_steps(self, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                        limit: int) -> int:
        """Largest ``k`` in ``[0, limit]`` with ``epsilon_after(delta, σ, q, k) <= target_epsilon``.

        ε grows with the number of steps, so a doubling search then a bisection finds the boundary exactly.
        """
        if not target_epsilon > 0:
            raise ValueError(error_message("target_epsilon", "> 0", target_epsilon))
        check_positive_int("limit", limit)

        def ok(k: int) -> bool:
            return self.epsilon_after(delta, noise_multiplier, sample_rate, k) <= target_epsilon

        if not ok(0) or not ok(1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and ok(hi):
            lo, hi = hi, hi * 2
        if hi > limit:
            if ok(limit):
                return limit
            hi = limit
        while hi - lo > 1:  # invariant: ok(lo), not ok(hi)
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def state_dict(self) -> dict:
        """Plain types only (loads with ``torch.load(weights_only=True)``)."""
        return {"accountant": self.name, "history": [[s, q, n] for s, q, n in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a history saved by :meth:`state_dict` of the same accountant type."""
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError(error_message("state", "a dict with 'accountant' and 'history'", type(state).__name__))
        if state.get("accountant") != self.name:
            raise ValueError(error_message("state['accountant']", f"{self.name!r}", state.get("accountant"),
                                           f"Load it into create_accountant({state.get('accountant')!r})."))
        history: list[tuple[float, float, int]] = []
        for entry in state["history"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(error_message("state['history'] entry", "[noise_multiplier, sample_rate, steps]", entry))
            _merge(history, _check_mechanism(float(entry[0]), float(entry[1]), int(entry[2])))
        self.history = history


class RDPAccountant(DPAccountant):
    """Rényi DP accountant (Opacus)."""

    name = "rdp"


class PRVAccountant(DPAccountant):
    """Privacy random variable accountant (Opacus); ε is the upper end of its error bracket."""

    name = "prv"


class GDPAccountant(DPAccountant):
    """Gaussian DP accountant (CLT approximation over the whole history)."""

    name = "gdp"


_CLASSES = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GDPAccountant}


def create_accountant(name: str) -> DPAccountant:
    """A new accountant: ``"rdp"``, ``"prv"`` or ``"gdp"`` (case-insensitive)."""
    return _CLASSES[check_choice("accountant", name, ACCOUNTANTS)]()
