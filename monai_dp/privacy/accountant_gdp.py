"""``"gdp"``: Gaussian DP through the central limit theorem (Bu et al. 2020), with Opacus' GDP analysis.

It is an *approximation*, not a bound (``is_upper_bound = False``): it can under-report ε for few steps or large
sample rates. Opacus' ``GaussianAccountant`` reads only the last history entry; here the entries compose
(μ² adds up over entries). Opacus is imported on the first query.
"""

from __future__ import annotations

import math

from monai_dp.privacy.accountant_base import DPAccountant
from monai_dp.privacy.mechanism import History

__all__ = ["GDP_MAX_EPSILON", "GDPAccountant"]

GDP_MAX_EPSILON = 500.0  # the bracket of Opacus' ε(μ) solver; beyond it ε is reported as inf


class GDPAccountant(DPAccountant):
    """Gaussian DP accountant: Opacus' CLT approximation, composed over the whole history (not a bound)."""

    name = "gdp"
    is_upper_bound = False

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        import numpy as np
        from opacus.accountants.analysis import gdp

        with np.errstate(over="ignore"):
            mu = math.sqrt(sum(gdp.compute_mu_poisson(steps=n, noise_multiplier=s, sample_rate=q) ** 2
                               for s, q, n in history))
        if not math.isfinite(mu):
            return math.inf
        if gdp.delta_eps_mu(eps=0.0, mu=mu) <= delta:
            return 0.0
        if gdp.delta_eps_mu(eps=GDP_MAX_EPSILON, mu=mu) > delta:
            return math.inf
        return gdp.eps_from_mu(mu=mu, delta=delta)
