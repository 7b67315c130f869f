"""Tight accounting with privacy loss distributions (Google's ``dp-accounting``), including groups of records.

- :class:`PLDAccountant` (``accountant="pld"``): the Poisson-sampled Gaussian mechanism, composed with the
  pessimistic PLD of ``dp_accounting`` (an upper bound on ε for any discretisation).
- :func:`compose_epsilon`: ε of several runs with different (σ, q, steps), each optionally protecting a
  *group* of ``k`` records that were sampled independently (a patient with ``k`` images under record-level
  sampling). For a group the mechanism is a Poisson-subsampled mixture of Gaussians: ``j`` of the ``k`` records
  enter a step with binomial probability ``Bin(j; k, q)`` and shift the noisy sum by ``j`` clip norms.
  This is the tight patient-level guarantee of a record-level run.
- :func:`group_privacy_epsilon`: the textbook (ε, δ) group-privacy conversion of the record-level guarantee
  (k ε, k e^{(k-1) ε} δ), for comparison only; it is far looser.

``dp_accounting`` is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from monai_dp.privacy.accountants import DPAccountant, History, _check_count, _check_mechanism
from monai_dp.utils.validation import check_open_unit_interval, check_positive

__all__ = ["Mechanism", "PLDAccountant", "compose_epsilon", "group_privacy_epsilon", "max_steps_within_budget",
           "patient_level_epsilon", "privacy_profile"]

PLD_INTERVAL = 1e-4  # value discretisation of the privacy loss for single records (dp_accounting's default)
PLD_GROUP_INTERVAL = 1e-3  # for groups: the loss range grows with k; still an upper bound, slightly looser
_PIP = "pip install dp-accounting"


class Mechanism(NamedTuple):
    """``steps`` steps of the Poisson-sampled Gaussian mechanism, protecting a group of ``group_size`` records."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    group_size: int = 1


def _dp_accounting():
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(f"PLD accounting needs Google's dp-accounting package: {_PIP}") from err
    return dp_event, pld_privacy_accountant


def _check(m: Mechanism | Sequence) -> Mechanism:
    m = Mechanism(*m)
    sigma, q, n = _check_mechanism(m.noise_multiplier, m.sample_rate, m.steps, "steps", 0)
    return Mechanism(sigma, q, n, _check_count("group_size", m.group_size, 1))


def _event(m: Mechanism):
    dp_event, _ = _dp_accounting()
    if m.group_size == 1:
        step = dp_event.PoissonSampledDpEvent(m.sample_rate, dp_event.GaussianDpEvent(m.noise_multiplier))
    else:
        weights = [math.comb(m.group_size, j) * m.sample_rate**j * (1 - m.sample_rate) ** (m.group_size - j)
                   for j in range(m.group_size + 1)]
        step = dp_event.MixtureOfGaussiansDpEvent(m.noise_multiplier, list(range(m.group_size + 1)), weights)
    return dp_event.SelfComposedDpEvent(step, m.steps)


@lru_cache(maxsize=2048)
def _epsilon(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    live = tuple(m for m in mechanisms if m.steps > 0)
    if not live:
        return 0.0
    if any(m.noise_multiplier == 0 for m in live):
        return math.inf
    dp_event, pld = _dp_accounting()
    interval = PLD_INTERVAL if all(m.group_size == 1 for m in live) else PLD_GROUP_INTERVAL
    acc = pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_event.ComposedDpEvent([_event(m) for m in live]))
    eps = float(acc.get_epsilon(delta))
    return math.inf if math.isnan(eps) else max(eps, 0.0)


def compose_epsilon(mechanisms: Sequence[Mechanism | Sequence], delta: float) -> float:
    """ε at ``delta`` of all ``mechanisms`` composed (tight PLD; 0 for none, ``inf`` if some σ is 0)."""
    delta = check_open_unit_interval("delta", delta)
    return _epsilon(tuple(_check(m) for m in mechanisms), delta)


def patient_level_epsilon(noise_multiplier: float, sample_rate: float, steps: int, records_per_patient: int,
                          delta: float) -> float:
    """ε for a patient with ``records_per_patient`` records, of a *record-level* run (tight mixture PLD)."""
    return compose_epsilon([Mechanism(noise_multiplier, sample_rate, steps, records_per_patient)], delta)


def group_privacy_epsilon(noise_multiplier: float, sample_rate: float, steps: int, group_size: int,
                          delta: float) -> float:
    """The loose (ε, δ) group-privacy bound for a group of ``group_size`` records, for comparison only.

    A record-level (ε₁, δ₁) guarantee gives a group of k records (k ε₁, δ₁ Σ_{i<k} e^{i ε₁}). This returns the
    smallest k ε₁ whose group δ is at most ``delta``, with ε₁(δ₁) from the RDP curve (dense orders, the
    conversion of Balle et al. 2020), which stays exact for the astronomically small δ₁ this needs;
    ``inf`` when no ε₁ below 10⁴ / k works.
    """
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    k = _check_count("group_size", group_size, 1)
    delta = check_open_unit_interval("delta", delta)
    sigma, q, n = _check_mechanism(noise_multiplier, sample_rate, steps, "steps", 1)
    if sigma == 0:
        return math.inf
    orders = np.concatenate([np.linspace(1.05, 10, 100), np.arange(10, 200, 0.5), np.arange(200, 4100, 5)])
    with np.errstate(all="ignore"):
        rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders), dtype=float)
        keep = np.isfinite(rdp)
        orders, rdp = orders[keep], rdp[keep]
        grid = np.arange(0.005, 1e4 / k, 0.005)
        best = math.inf
        for chunk in np.array_split(grid, max(1, len(grid) // 20000)):
            # log of Σ_{i<k} e^{i ε₁}, computed without overflow
            log_sum = (k - 1) * chunk + np.log(-np.expm1(-k * chunk)) - np.log(-np.expm1(-chunk))
            log_delta1 = math.log(delta) - log_sum
            eps1 = np.min(rdp[None, :] - (log_delta1[:, None] + np.log(orders)[None, :]) / (orders[None, :] - 1)
                          + np.log((orders - 1) / orders)[None, :], axis=1)
            ok = np.nonzero(eps1 <= chunk)[0]
            if len(ok):
                best = float(k * chunk[ok[0]])
                break
    return best


def max_steps_within_budget(spent: Sequence[Mechanism | Sequence], noise_multiplier: float, sample_rate: float,
                            group_size: int, target_epsilon: float, delta: float, limit: int) -> int:
    """Largest ``n`` in ``[0, limit]`` such that ``spent`` plus ``n`` steps of (σ, q, group) stay within ε.

    Used by the privacy ledger to shorten or refuse a run before its first step.
    """
    target_epsilon = check_positive("target_epsilon", target_epsilon)
    limit = _check_count("limit", limit, 0)
    base = [_check(m) for m in spent]

    def ok(n: int) -> bool:
        return compose_epsilon([*base, Mechanism(noise_multiplier, sample_rate, n, group_size)], delta) <= target_epsilon

    if not ok(0):
        return 0
    lo, hi = 0, 1
    while True:
        probe = min(hi, limit)
        if not ok(probe):
            hi = probe
            break
        lo = probe
        if probe == limit:
            return limit
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def privacy_profile(mechanisms: Sequence[Mechanism | Sequence], epsilons: Sequence[float]) -> list[float]:
    """δ(ε) of the composed ``mechanisms`` at each ε of ``epsilons`` (the privacy profile; an upper bound).

    The profile determines the mechanism's whole trade-off curve between false and true positive rates of any
    membership test, which :mod:`monai_dp.audit.bounds` turns into bounds on attacks.
    """
    mech = tuple(m for m in (_check(m) for m in mechanisms) if m.steps > 0)
    if not mech:
        return [0.0 for _ in epsilons]
    if any(m.noise_multiplier == 0 for m in mech):
        return [1.0 for _ in epsilons]
    dp_event, pld = _dp_accounting()
    interval = PLD_INTERVAL if all(m.group_size == 1 for m in mech) else PLD_GROUP_INTERVAL
    acc = pld.PLDAccountant(value_discretization_interval=max(interval, 1e-3))
    acc.compose(dp_event.ComposedDpEvent([_event(m) for m in mech]))
    return [float(min(1.0, max(0.0, acc.get_delta(float(e))))) for e in epsilons]


class PLDAccountant(DPAccountant):
    """Privacy loss distribution accountant (``dp-accounting``): tight, a pessimistic upper bound on ε."""

    name = "pld"

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        return _epsilon(tuple(Mechanism(s, q, n) for s, q, n in history), delta)

