"""``"pld"``: the privacy loss distribution accountant of Google's ``dp-accounting``; tight, a pessimistic upper
bound on ε for any discretisation. Also the PLD composition of :class:`Mechanism` lists (groups of records
included) behind :mod:`monai_dp.privacy.pld`. ``dp_accounting`` is imported on first use."""

from __future__ import annotations

import math
from functools import lru_cache

from monai_dp.privacy.accountant_base import DPAccountant
from monai_dp.privacy.mechanism import History, Mechanism

__all__ = ["PLD_GROUP_INTERVAL", "PLD_INTERVAL", "PLDAccountant"]

PLD_INTERVAL = 1e-4  # value discretisation of the privacy loss for single records (dp_accounting's default)
PLD_GROUP_INTERVAL = 1e-3  # for groups: the loss range grows with k; still an upper bound, slightly looser
_PIP = "pip install dp-accounting"


def dp_accounting_modules():
    """``(dp_event, pld_privacy_accountant)`` of ``dp_accounting``, or an ``ImportError`` with the pip command."""
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(f"PLD accounting needs Google's dp-accounting package: {_PIP}") from err
    return dp_event, pld_privacy_accountant


def dp_event_of(m: Mechanism):
    """The ``dp_accounting`` event of ``m``: a Poisson-sampled Gaussian, or for a group of ``k`` records the
    mixture of Gaussians in which ``j`` of them enter a step with probability ``Bin(j; k, q)``."""
    dp_event, _ = dp_accounting_modules()
    if m.group_size == 1:
        step = dp_event.PoissonSampledDpEvent(m.sample_rate, dp_event.GaussianDpEvent(m.noise_multiplier))
    else:
        weights = [math.comb(m.group_size, j) * m.sample_rate**j * (1 - m.sample_rate) ** (m.group_size - j)
                   for j in range(m.group_size + 1)]
        step = dp_event.MixtureOfGaussiansDpEvent(m.noise_multiplier, list(range(m.group_size + 1)), weights)
    return dp_event.SelfComposedDpEvent(step, m.steps)


def composed_pld(mechanisms: tuple[Mechanism, ...], minimum_interval: float = 0.0):
    """A ``dp_accounting`` PLD accountant with every mechanism (all with steps > 0 and σ > 0) composed."""
    dp_event, pld = dp_accounting_modules()
    interval = PLD_INTERVAL if all(m.group_size == 1 for m in mechanisms) else PLD_GROUP_INTERVAL
    acc = pld.PLDAccountant(value_discretization_interval=max(interval, minimum_interval))
    acc.compose(dp_event.ComposedDpEvent([dp_event_of(m) for m in mechanisms]))
    return acc


@lru_cache(maxsize=2048)
def pld_epsilon(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    """ε at ``delta`` of validated ``mechanisms`` composed: 0 for none with steps, ``inf`` if some σ is 0."""
    live = tuple(m for m in mechanisms if m.steps > 0)
    if not live:
        return 0.0
    if any(m.noise_multiplier == 0 for m in live):
        return math.inf
    eps = float(composed_pld(live).get_epsilon(delta))
    return math.inf if math.isnan(eps) else max(eps, 0.0)


class PLDAccountant(DPAccountant):
    """Privacy loss distribution accountant (``dp-accounting``): tight, a pessimistic upper bound on ε."""

    name = "pld"
    is_upper_bound = True

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        return pld_epsilon(tuple(Mechanism.from_entry(entry) for entry in history), delta)
