"""Validation of the DP settings of a trainer, kept apart from the engine so it is easy to test and read."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from monai_dp.privacy import accountant_is_upper_bound, accountant_names
from monai_dp.utils.errors import DPConfigurationError
from monai_dp.utils.validation import (
    check_choice,
    check_positive,
    check_positive_int,
    error_message,
    is_real,
)

__all__ = ["DPSettings", "check_amp", "resolve_delta"]

logger = logging.getLogger(__name__)


@dataclass
class DPSettings:
    """The DP knobs of :class:`~monai_dp.engines.DPSupervisedTrainer`, checked."""

    target_epsilon: float | None
    target_delta: float | None
    noise_multiplier: float | None
    max_grad_norm: float
    accountant: str
    max_physical_batch_size: int | None
    allow_approximate_accounting: bool = False

    def __post_init__(self) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                error_message(
                    "target_epsilon", "given when `noise_multiplier` is not", None,
                    "Give `target_epsilon` (σ is then calibrated over `max_epochs`) or `noise_multiplier`.",
                )
            )
        if self.target_epsilon is not None:
            self.target_epsilon = check_positive("target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            self.noise_multiplier = check_positive(
                "noise_multiplier", self.noise_multiplier, "σ = 0 adds no noise and gives no privacy."
            )
        self.max_grad_norm = check_positive("max_grad_norm", self.max_grad_norm)
        self.accountant = check_choice("accountant", self.accountant, tuple(accountant_names()))
        bound = accountant_is_upper_bound(self.accountant)
        if not bound and not self.allow_approximate_accounting:
            raise DPConfigurationError(
                error_message("accountant", "'prv', 'pld' or 'rdp' unless `allow_approximate_accounting=True`",
                              self.accountant,
                              "GDP accounting is a central-limit approximation, not a bound: it can under-report "
                              "ε by 15 % and more (19 % at q = 0.1, σ = 1.025, 30 steps, δ = 1e-3; "
                              "docs/privacy.md). Use 'prv' or 'pld' (tight bounds).")
            )
        if not bound:
            logger.warning("accountant=%r: ε is an approximation, not a guaranteed bound.", self.accountant)
        if self.max_physical_batch_size is not None:
            check_positive_int("max_physical_batch_size", self.max_physical_batch_size)


def resolve_delta(target_delta: float | None, num_units: int, unit: str = "record") -> float:
    """Check δ against the number of protected units N; default ``min(1e-5, 1 / (10 N))``.

    δ >= 1/N allows a mechanism that publishes one unit's data outright, so it is refused; δ > 1/(10 N) is
    allowed with a warning. NumPy scalars (``np.float32(1e-5)``) are accepted; bools and NaN are refused.
    """
    if target_delta is None:
        delta = min(1e-5, 1.0 / (10 * num_units))
        logger.info("target_delta not given; using %.3g = min(1e-5, 1/(10 N)) with N = %d %ss.", delta, num_units, unit)
        return delta
    if not is_real(target_delta):  # Python or NumPy ints and floats; bools are refused
        raise TypeError(error_message("target_delta", "a number", type(target_delta).__name__))
    if not (0 < target_delta < 1.0 / num_units):
        raise ValueError(
            error_message(
                "target_delta", f"in (0, 1/N) = (0, {1.0 / num_units:.3g}) for N = {num_units} {unit}s", target_delta,
                "Use δ well below 1/N, e.g. 1/(10 N) or 1e-5.",
            )
        )
    if target_delta > 1.0 / (10 * num_units):
        logger.warning(
            "target_delta = %.3g is above 1/(10 N) = %.3g for N = %d %ss; a smaller δ is advisable.",
            target_delta, 1.0 / (10 * num_units), num_units, unit,
        )
    return float(target_delta)


def check_amp(amp: bool, amp_kwargs: dict | None):
    """The autocast dtype for DP mixed precision: bfloat16 with no GradScaler, or ``None`` when ``amp`` is off.

    A GradScaler multiplies per-sample gradients before they are clipped (the effective clip becomes C/scale)
    and skips steps on overflow, a data-dependent decision no accountant covers; so float16 is refused.
    """
    import torch

    if not amp:
        return None
    dtype = (amp_kwargs or {}).get("dtype", torch.bfloat16)
    if dtype != torch.bfloat16:
        raise DPConfigurationError(
            error_message(
                "amp_kwargs['dtype']", "torch.bfloat16 with DP training", dtype,
                "float16 needs a GradScaler, which scales per-sample gradients before clipping; use bfloat16.",
            )
        )
    extra = set(amp_kwargs or {}) - {"dtype", "enabled", "cache_enabled"}
    if extra:
        raise DPConfigurationError(error_message("amp_kwargs", "a subset of {'dtype', 'enabled', 'cache_enabled'}",
                                                 sorted(extra)))
    return dtype
