"""Noise calibration: the smallest σ whose ε over the planned steps stays within the budget."""

from __future__ import annotations

import numbers
import warnings

from monai_dp.privacy.registry import create_accountant
from monai_dp.utils.validation import (
    check_open_unit_interval,
    check_positive,
    check_positive_int,
    error_message,
)

__all__ = ["MAX_NOISE_MULTIPLIER", "calibrate_noise_multiplier"]

MAX_NOISE_MULTIPLIER = 1e4
_RELATIVE_SIGMA_RESOLUTION = 1e-6  # stop bisecting once σ is known this finely, whatever ε does


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", epsilon_tolerance: float = 0.01,
                               prior_history: tuple = ()) -> float:
    """Smallest σ (within tolerance) such that ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``.

    σ is doubled from 1 (or halved) to bracket the target, then bisected keeping the invariant
    ``ε(σ_high) <= target_epsilon``; ``σ_high`` is returned once ``target_epsilon - ε(σ_high)`` is at most
    ``epsilon_tolerance``. The guarantee ``ε(σ) <= target_epsilon`` therefore holds by construction, under
    the same accountant that will account the run.

    Args:
        target_epsilon: privacy budget ε, > 0.
        target_delta: δ in (0, 1).
        sample_rate: Poisson sample rate q in (0, 1].
        steps: planned number of steps, >= 1.
        accountant: ``"prv"``, ``"rdp"``, ``"gdp"``, ``"pld"`` or a registered name.
        epsilon_tolerance: how far below the target the returned σ's ε may be.
        prior_history: ``(σ, q, n)`` entries spent before these steps (a release of statistics), composed with
            them: the returned σ keeps the composition within the target.

    Raises:
        ValueError: for bad arguments, or when even σ = ``MAX_NOISE_MULTIPLIER`` spends more than the target.
    """
    target_epsilon = check_positive("target_epsilon", target_epsilon)
    target_delta = check_open_unit_interval("target_delta", target_delta)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(error_message("sample_rate", "a number", type(sample_rate).__name__))
    if not 0 < sample_rate <= 1:
        raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
    sample_rate = float(sample_rate)
    steps = check_positive_int("steps", steps)
    epsilon_tolerance = check_positive("epsilon_tolerance", epsilon_tolerance)
    acc = create_accountant(accountant)
    for entry in prior_history:
        acc.step(*entry)

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():  # probing tiny σ may hit the PRV -> RDP fallback; that is no concern here
            warnings.filterwarnings("ignore", message="PRV accounting does not apply", category=RuntimeWarning)
            return acc.epsilon_after(target_delta, sigma, sample_rate, steps)

    high, low = _bracket(eps, target_epsilon)
    eps_high = eps(high)
    while target_epsilon - eps_high > epsilon_tolerance and high - low > _RELATIVE_SIGMA_RESOLUTION * high:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def _bracket(eps, target_epsilon: float) -> tuple[float, float]:
    """``(high, low)`` with ``eps(high) <= target_epsilon < eps(low)`` (``low = 0`` when σ → 0 never exceeds it)."""
    if eps(1.0) <= target_epsilon:
        high = 1.0
        while high > 1e-3:  # below σ = 1e-3 ε is astronomically large for any useful run
            if eps(high / 2) > target_epsilon:
                return high, high / 2
            high /= 2
        return high, 0.0
    low = 1.0
    while low < MAX_NOISE_MULTIPLIER:
        high = min(2 * low, MAX_NOISE_MULTIPLIER)
        if eps(high) <= target_epsilon:
            return high, low
        low = high
    raise ValueError(error_message(
        "target_epsilon", f"reachable with noise_multiplier <= {MAX_NOISE_MULTIPLIER:g}", target_epsilon,
        f"Even σ = {MAX_NOISE_MULTIPLIER:g} spends ε = {eps(MAX_NOISE_MULTIPLIER):.4g}; raise the budget, "
        "or lower the sample rate or the number of steps."))
