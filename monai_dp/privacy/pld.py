"""Tight accounting with privacy loss distributions (Google's ``dp-accounting``), including groups of records.

- :class:`PLDAccountant` (``accountant="pld"``, in :mod:`monai_dp.privacy.accountant_pld`): the Poisson-sampled
  Gaussian mechanism, composed with the pessimistic PLD of ``dp_accounting`` (an upper bound on ε for any
  discretisation).
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

from monai_dp.privacy.accountant_pld import (
    PLD_GROUP_INTERVAL,
    PLD_INTERVAL,
    PLDAccountant,
    composed_pld,
    pld_epsilon,
)
from monai_dp.privacy.mechanism import (
    Mechanism,
    check_count,
    check_entry,
    largest_passing,
)
from monai_dp.utils.validation import check_open_unit_interval, check_positive

__all__ = [
    "PLD_GROUP_INTERVAL",
    "PLD_INTERVAL",
    "Mechanism",
    "PLDAccountant",
    "compose_epsilon",
    "group_privacy_epsilon",
    "max_steps_within_budget",
    "patient_level_epsilon",
    "privacy_profile",
]


def compose_epsilon(mechanisms: Sequence[Mechanism | Sequence], delta: float) -> float:
    """ε at ``delta`` of all ``mechanisms`` composed (tight PLD; 0 for none, ``inf`` if some σ is 0)."""
    delta = check_open_unit_interval("delta", delta)
    return pld_epsilon(tuple(Mechanism.checked(m) for m in mechanisms), delta)


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

    k = check_count("group_size", group_size, 1)
    delta = check_open_unit_interval("delta", delta)
    sigma, q, n = check_entry(noise_multiplier, sample_rate, steps, "steps", 1)
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
    limit = check_count("limit", limit, 0)
    base = [Mechanism.checked(m) for m in spent]

    def ok(n: int) -> bool:
        return compose_epsilon([*base, Mechanism(noise_multiplier, sample_rate, n, group_size)], delta) <= target_epsilon

    return largest_passing(ok, limit) if ok(0) else 0


def privacy_profile(mechanisms: Sequence[Mechanism | Sequence], epsilons: Sequence[float]) -> list[float]:
    """δ(ε) of the composed ``mechanisms`` at each ε of ``epsilons`` (the privacy profile; an upper bound).

    The profile determines the mechanism's whole trade-off curve between false and true positive rates of any
    membership test, which :mod:`monai_dp.audit.bounds` turns into bounds on attacks.
    """
    mech = tuple(m for m in (Mechanism.checked(m) for m in mechanisms) if m.steps > 0)
    if not mech:
        return [0.0 for _ in epsilons]
    if any(m.noise_multiplier == 0 for m in mech):
        return [1.0 for _ in epsilons]
    acc = composed_pld(mech, minimum_interval=1e-3)
    return [float(min(1.0, max(0.0, acc.get_delta(float(e))))) for e in epsilons]
