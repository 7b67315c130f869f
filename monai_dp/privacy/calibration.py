"""Noise calibration: the smallest σ whose ε over the planned steps stays within the budget."""

from __future__ import annotations

from monai_dp.privacy.accountants import create_accountant
from monai_dp.utils.validation import check_open_unit_interval, check_positive, check_positive_int, error_message

__all__ = ["calibrate_noise_multiplier"]

MAX_NOISE_MULTIPLIER = 1e4


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", epsilon_tolerance: float = 0.01) -> float:
    """σ such that ``steps`` steps at rate ``sample_rate`` spend at most ``target_epsilon`` at ``target_delta``.

    Bisection on σ keeping the invariant ε(σ_high) <= target, stopped once ε(σ_high) is within
    ``epsilon_tolerance`` of the target; σ_high is returned, so the guarantee holds by construction.
    """
    target_epsilon = check_positive("target_epsilon", target_epsilon)
    target_delta = check_open_unit_interval("target_delta", target_delta)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
    check_positive_int("steps", steps)
    check_positive("epsilon_tolerance", epsilon_tolerance)
    acc = create_accountant(accountant)

    def eps(sigma: float) -> float:
        return acc.epsilon_after(target_delta, sigma, sample_rate, steps)

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(error_message("target_epsilon", f"reachable with σ <= {MAX_NOISE_MULTIPLIER:g}",
                                           target_epsilon, "Raise the budget, lower the sample rate or the steps."))
        eps_high = eps(high)
    while target_epsilon - eps_high > epsilon_tolerance and high - low > 1e-6:
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high
