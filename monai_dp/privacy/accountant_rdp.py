"""``"rdp"``: Opacus' Rényi DP accountant (Mironov 2017) over Opacus' orders plus 128, 256, 512 and 1024; a valid
but looser upper bound on ε. Opacus is imported on the first query."""

from __future__ import annotations

import warnings
from functools import lru_cache

from monai_dp.privacy.accountant_base import DPAccountant
from monai_dp.privacy.mechanism import History

__all__ = ["RDP_EXTRA_ORDERS", "RDPAccountant"]

RDP_EXTRA_ORDERS = (128, 256, 512, 1024)  # tighten small ε; Opacus' defaults stop at 63


class RDPAccountant(DPAccountant):
    """Rényi DP accountant (Opacus): a valid, looser upper bound on ε."""

    name = "rdp"
    is_upper_bound = True

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        from opacus.accountants import RDPAccountant as OpacusRDP

        return rdp_epsilon(history, delta, tuple(OpacusRDP.DEFAULT_ALPHAS) + RDP_EXTRA_ORDERS)


@lru_cache(maxsize=256)
def rdp_per_step(sigma: float, q: float, orders: tuple[float, ...]):
    """Opacus' RDP of one step of the sampled Gaussian mechanism at each order (read-only array).

    RDP composes by addition, so ``T`` steps cost ``T`` times this vector (Opacus' own ``compute_rdp``
    multiplies the same way); caching it per ``(σ, q)`` spares every later query of a growing history the
    slow series Opacus evaluates for each fractional order.
    """
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)), dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def rdp_epsilon(history: History, delta: float, orders: tuple[float, ...]) -> float:
    """Opacus' RDP ε of ``history`` at ``delta`` over ``orders``, from the cached per-step vectors."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(n * rdp_per_step(sigma, q, orders) for sigma, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": expected for tiny or huge ε
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)
