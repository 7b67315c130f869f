"""Privacy accountants behind one small interface (the names importable from here before the split).

An accountant records the history of the Poisson-sampled Gaussian mechanism as merged
``(noise_multiplier, sample_rate, num_steps)`` entries and converts it to ε at a given δ. Each query builds
a fresh computation from the whole history. One module per accountant:

- ``"prv"`` (:mod:`~monai_dp.privacy.accountant_prv`): Opacus' privacy random variable accountant; an upper
  bound close to the exact privacy loss distribution.
- ``"rdp"`` (:mod:`~monai_dp.privacy.accountant_rdp`): Opacus' Rényi DP accountant; a valid but looser bound.
- ``"pld"`` (:mod:`~monai_dp.privacy.accountant_pld`): Google's ``dp-accounting`` PLD; tight, an upper bound.
- ``"gdp"`` (:mod:`~monai_dp.privacy.accountant_gdp`): Opacus' central-limit approximation, *not* a bound.

The interface is :class:`~monai_dp.privacy.accountant_base.DPAccountant`, the step type and the step search are
in :mod:`~monai_dp.privacy.mechanism`, names are resolved by :mod:`~monai_dp.privacy.registry`. The step count
is counted from the history (Opacus' ``len(accountant)`` is not the step count). Opacus is imported on the
first query, so importing this module loads neither ignite nor ``torch.nn``.

Constants re-exported here are copies: patch them in the accountant's own module.
"""

from __future__ import annotations

from monai_dp.privacy.accountant_base import DPAccountant
from monai_dp.privacy.accountant_gdp import GDP_MAX_EPSILON, GDPAccountant
from monai_dp.privacy.accountant_pld import PLDAccountant
from monai_dp.privacy.accountant_prv import (
    PRV_EPS_ERROR,
    PRV_MAX_DOMAIN,
    PRV_MAX_GRID,
    PRVAccountant,
)
from monai_dp.privacy.accountant_prv import prv_domain as _prv_domain  # noqa: F401 - the names before the split
from monai_dp.privacy.accountant_prv import prv_eps_error as _prv_eps_error  # noqa: F401
from monai_dp.privacy.accountant_prv import prv_epsilon as _prv_epsilon  # noqa: F401
from monai_dp.privacy.accountant_rdp import RDP_EXTRA_ORDERS, RDPAccountant
from monai_dp.privacy.accountant_rdp import rdp_epsilon as _rdp_epsilon  # noqa: F401
from monai_dp.privacy.accountant_rdp import rdp_per_step as _rdp_per_step  # noqa: F401
from monai_dp.privacy.mechanism import Entry, History
from monai_dp.privacy.registry import (
    ACCOUNTANTS,
    accountant_is_upper_bound,
    accountant_names,
    create_accountant,
    register_accountant,
)

__all__ = [
    "ACCOUNTANTS",
    "GDP_MAX_EPSILON",
    "PRV_EPS_ERROR",
    "PRV_MAX_DOMAIN",
    "PRV_MAX_GRID",
    "RDP_EXTRA_ORDERS",
    "DPAccountant",
    "Entry",
    "GDPAccountant",
    "History",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "accountant_is_upper_bound",
    "accountant_names",
    "create_accountant",
    "register_accountant",
]
