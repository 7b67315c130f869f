"""Privacy accountants behind one small interface.

An accountant records the history of the Poisson-sampled Gaussian mechanism as merged
``(noise_multiplier, sample_rate, num_steps)`` entries and converts it to ε at a given δ. Each query builds
a fresh Opacus computation from the whole history:

- ``"prv"``: Opacus' privacy random variable accountant (Gopi et al. 2021). The upper end of its error
  bracket is returned, so ε is a bound; it is close to the exact privacy loss distribution.
- ``"rdp"``: Opacus' Rényi DP accountant (Mironov 2017) over Opacus' orders plus 128, 256, 512 and 1024;
  a valid but looser bound.
- ``"pld"``: the privacy loss distribution accountant of Google's ``dp-accounting`` (see
  :mod:`monai_dp.privacy.pld`): tight, a pessimistic upper bound.
- ``"gdp"``: Gaussian DP through the central limit theorem (Bu et al. 2020), with Opacus' GDP analysis.
  It is an *approximation*, not a bound: it can under-report ε for few steps or large sample rates.
  Opacus' ``GaussianAccountant`` reads only the last history entry; here the entries compose
  (μ² adds up over entries).

The step count is counted here from the history (Opacus' ``len(accountant)`` is not the step count).
Opacus is imported on the first query, so importing this module loads neither ignite nor ``torch.nn``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache
from typing import Any

from monai_dp.utils.validation import (
    check_choice,
    check_open_unit_interval,
    check_positive,
    error_message,
)

__all__ = ["ACCOUNTANTS", "DPAccountant", "GDPAccountant", "PRVAccountant", "RDPAccountant", "create_accountant"]

ACCOUNTANTS = ("rdp", "prv", "gdp", "pld")
PRV_EPS_ERROR = 0.01  # PRV's allowed error on ε; the bound is estimate + error (widened only for huge grids)
PRV_MAX_GRID = 2**22  # discretisation points; Opacus needs about 190 bytes and 0.5 µs per point
PRV_MAX_DOMAIN = 500.0  # Opacus' PRV returns inf near 2000; ε is then in the hundreds and RDP is as useful
RDP_EXTRA_ORDERS = (128, 256, 512, 1024)  # tighten small ε; Opacus' defaults stop at 63
GDP_MAX_EPSILON = 500.0  # the bracket of Opacus' ε(μ) solver; beyond it ε is reported as inf

Entry = tuple[float, float, int]
History = tuple[Entry, ...]


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(error_message(name, "an int", type(value).__name__))
    if not value >= minimum:
        raise ValueError(error_message(name, f"an int >= {minimum}", value))
    return int(value)


def _check_mechanism(noise_multiplier: Any, sample_rate: Any, num_steps: Any, steps_name: str = "num_steps",
                     min_steps: int = 1) -> Entry:
    """Validated ``(σ, q, n)`` as plain ``(float, float, int)``."""
    for name, value in (("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(error_message(name, "a number", type(value).__name__))
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(error_message("noise_multiplier", "a finite number >= 0", noise_multiplier))
    if not 0 < sample_rate <= 1:
        raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
    return float(noise_multiplier), float(sample_rate), _check_count(steps_name, num_steps, min_steps)


def _merge(history: list[Entry], entry: Entry) -> None:
    """Append ``entry``, adding its steps to the last entry when (σ, q) are equal."""
    if entry[2] == 0:
        return
    if history and history[-1][:2] == entry[:2]:
        history[-1] = (entry[0], entry[1], history[-1][2] + entry[2])
    else:
        history.append(entry)


@lru_cache(maxsize=4096)
def _cached_epsilon(cls: type[DPAccountant], history: History, delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    eps = float(cls.compute_epsilon(history, delta))
    return math.inf if math.isnan(eps) else max(eps, 0.0)


@lru_cache(maxsize=1024)
def _cached_max_extra_steps(cls: type[DPAccountant], history: History, target_epsilon: float, delta: float,
                            entry: tuple[float, float], limit: int) -> int:
    def ok(k: int) -> bool:
        extended = list(history)
        _merge(extended, (entry[0], entry[1], k))
        return _cached_epsilon(cls, tuple(extended), delta) <= target_epsilon

    lo, hi = 0, 1  # exponential search for a failing count, then bisection keeping ok(lo), not ok(hi)
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
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


class DPAccountant:
    """Base accountant: a merged history of sampled Gaussian mechanism steps and the ε it spends.

    Subclasses set ``name`` and implement :meth:`compute_epsilon`. Results are cached on the history, so
    repeated queries (budget checks, logging) cost nothing.

    Attributes:
        name: ``"rdp"``, ``"prv"`` or ``"gdp"``; stored in :meth:`state_dict` and checked on load.
        history: ``(noise_multiplier, sample_rate, num_steps)`` entries, consecutive equal (σ, q) merged.
    """

    name: str = ""

    def __init__(self) -> None:
        self.history: list[Entry] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, history={self.history})"

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        """ε of a non-empty history with every σ > 0, at ``delta``."""
        raise NotImplementedError

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(int(n) for _, _, n in self.history)

    def _history(self) -> History:
        return tuple(tuple(entry) for entry in self.history)  # type: ignore[misc]

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with noise multiplier σ and Poisson sample rate q."""
        _merge(self.history, _check_mechanism(noise_multiplier, sample_rate, num_steps))

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``: 0 with no steps, ``inf`` if a step had σ = 0."""
        delta = check_open_unit_interval("delta", delta)
        return _cached_epsilon(type(self), self._history(), delta)

    def epsilon_after(self, delta: float, noise_multiplier: float, sample_rate: float, extra_steps: int) -> float:
        """ε if ``extra_steps`` more steps of (σ, q) were taken; the accountant is not changed."""
        delta = check_open_unit_interval("delta", delta)
        history = list(self._history())
        _merge(history, _check_mechanism(noise_multiplier, sample_rate, extra_steps, "extra_steps", 0))
        return _cached_epsilon(type(self), tuple(history), delta)

    def max_extra_steps(self, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                        limit: int) -> int:
        """Largest ``k`` in ``[0, limit]`` with ``epsilon_after(delta, σ, q, k) <= target_epsilon``.

        ε grows with the number of steps, so an exponential search then a bisection finds the boundary
        with about ``2 log2(k)`` queries. Returns 0 when the recorded history alone exceeds the target.
        """
        target_epsilon = check_positive("target_epsilon", target_epsilon)
        delta = check_open_unit_interval("delta", delta)
        sigma, q, limit = _check_mechanism(noise_multiplier, sample_rate, limit, "limit", 0)
        return _cached_max_extra_steps(type(self), self._history(), target_epsilon, delta, (sigma, q), limit)

    def state_dict(self) -> dict:
        """``{"accountant": name, "history": [[σ, q, n], ...]}``, plain types (``torch.load(weights_only=True)``)."""
        return {"accountant": self.name, "history": [[float(s), float(q), int(n)] for s, q, n in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with one saved by :meth:`state_dict` of the same accountant type."""
        if not isinstance(state, dict):
            raise TypeError(error_message("state", "a dict", type(state).__name__))
        if "accountant" not in state or "history" not in state:
            raise ValueError(error_message("state", "a dict with keys 'accountant' and 'history'", list(state)))
        if state["accountant"] != self.name:
            raise ValueError(error_message(
                "state['accountant']", f"{self.name!r} to load into {type(self).__name__}", state["accountant"],
                f"Load it with create_accountant({state['accountant']!r}) instead."))
        if not isinstance(state["history"], (list, tuple)):
            raise TypeError(error_message("state['history']", "a list", type(state["history"]).__name__))
        history: list[Entry] = []
        for i, entry in enumerate(state["history"]):
            constraint = "[noise_multiplier, sample_rate, num_steps]"
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(error_message(f"state['history'][{i}]", constraint, entry))
            try:
                _merge(history, _check_mechanism(*entry))
            except (TypeError, ValueError) as err:
                raise ValueError(error_message(f"state['history'][{i}]", f"a valid {constraint}", entry,
                                               str(err))) from err
        self.history = history


class RDPAccountant(DPAccountant):
    """Rényi DP accountant (Opacus): a valid, looser upper bound on ε."""

    name = "rdp"

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        from opacus.accountants import RDPAccountant as OpacusRDP

        return _rdp_epsilon(history, delta, tuple(OpacusRDP.DEFAULT_ALPHAS) + RDP_EXTRA_ORDERS)


@lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float, orders: tuple[float, ...]):
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


def _rdp_epsilon(history: History, delta: float, orders: tuple[float, ...]) -> float:
    """Opacus' RDP ε of ``history`` at ``delta`` over ``orders``, from the cached per-step vectors."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(n * _rdp_per_step(sigma, q, orders) for sigma, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": expected for tiny or huge ε
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def _prv_domain(history: History, delta_error: float, eps_error: float = PRV_EPS_ERROR) -> float:
    """Half-width ``L`` of the privacy loss domain ``[-L, L]`` Opacus discretises for this history.

    Opacus' ``compute_safe_domain_size`` (Gopi et al. 2021, remark 5.6): the larger of the RDP ε of the whole
    history at ``delta_error / 4`` and of one step of each entry at ``delta_error / (8 T)``, plus 3; the same
    computation with the RDP vectors cached per ``(σ, q)`` (tested equal to Opacus').
    """
    from opacus.accountants import RDPAccountant as OpacusRDP

    orders = tuple(OpacusRDP.DEFAULT_ALPHAS)
    total = sum(n for _, _, n in history)
    bound = _rdp_epsilon(history, delta_error / 4, orders)
    for sigma, q, _ in history:
        bound = max(bound, _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total), orders))
    return max(bound, eps_error) + 3


def _prv_eps_error(history: History, delta_error: float, domain: float) -> float:
    """``PRV_EPS_ERROR``, widened in proportion when Opacus' grid would pass ``PRV_MAX_GRID`` points.

    Opacus' mesh is ``eps_error / sqrt(T log(12 / delta_error) / 2)`` on ``[-L, L]``: long runs (10⁵-10⁶
    steps) would need gigabytes. A wider error bracket keeps the upper bound valid, only looser.
    """
    total = sum(n for _, _, n in history)
    points = 2 * domain * math.sqrt(total * math.log(12 / delta_error) / 2) / PRV_EPS_ERROR
    return PRV_EPS_ERROR * max(1.0, points / PRV_MAX_GRID)


def _prv_epsilon(history: History, delta: float, eps_error: float, delta_error: float) -> float:
    """Opacus' ``PRVAccountant.get_epsilon`` (the upper end of its bracket), assembled from Opacus' own parts.

    The one difference: the domain comes from :func:`_prv_domain`, with cached RDP vectors, instead of being
    recomputed from scratch twice per query. Tested equal to Opacus' result.
    """
    import numpy as np
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    total = sum(n for _, _, n in history)
    half_width = _prv_domain(history, delta_error, eps_error)
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    dprvs = [discretize(TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min,
                                                       domain.t_max), domain) for sigma, q, _ in history]
    dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[n for _, _, n in history])
    return float(dprv.compute_epsilon(delta, delta_error, eps_error)[2])


class PRVAccountant(DPAccountant):
    """Privacy random variable accountant (Opacus); ε is the upper end of its error bracket.

    Where Opacus' numerics do not apply, the RDP bound is returned instead with a ``RuntimeWarning``: still
    a valid bound, only looser. That happens for ε in the hundreds (privacy loss domain beyond
    ``PRV_MAX_DOMAIN``), for δ below about 1e-13, or when Opacus fails or returns ``inf``.
    """

    name = "prv"

    @staticmethod
    def compute_epsilon(history: History, delta: float) -> float:
        import numpy as np

        delta_error = delta / 1000  # Opacus' default
        eps, reason = math.nan, ""
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
                domain = _prv_domain(history, delta_error)
                if domain > PRV_MAX_DOMAIN:
                    reason = "the privacy loss domain exceeds PRV_MAX_DOMAIN: ε is in the hundreds"
                else:
                    eps_error = _prv_eps_error(history, delta_error, domain)
                    eps = _prv_epsilon(history, delta, eps_error, delta_error)
                    reason = "Opacus returned a non-finite ε"
        except (ValueError, RuntimeError) as err:
            reason = f"Opacus raised {type(err).__name__}: {err}"
        if math.isfinite(eps):
            return eps
        # constant text per reason, so the default warning filter shows it once, not on every step
        warnings.warn(f"PRV accounting does not apply ({reason}); reporting the RDP bound instead (valid, looser).",
                      RuntimeWarning, stacklevel=2)
        return RDPAccountant.compute_epsilon(history, delta)


class GDPAccountant(DPAccountant):
    """Gaussian DP accountant: Opacus' CLT approximation, composed over the whole history (not a bound)."""

    name = "gdp"

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


_CLASSES: dict[str, type[DPAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GDPAccountant}


def create_accountant(name: str) -> DPAccountant:
    """A new, empty accountant: ``"rdp"``, ``"prv"``, ``"gdp"`` or ``"pld"`` (case-insensitive)."""
    name = check_choice("accountant", name, ACCOUNTANTS)
    if name == "pld":
        from monai_dp.privacy.pld import (
            PLDAccountant,  # imports this module: registered lazily
        )

        return PLDAccountant()
    return _CLASSES[name]()
