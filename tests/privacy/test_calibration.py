"""Noise calibration: the returned σ meets the budget, is not wastefully large, and matches Opacus' search."""

from __future__ import annotations

import warnings

import pytest

from monai_dp.privacy import ACCOUNTANTS, calibrate_noise_multiplier, create_accountant
from monai_dp.utils.errors import PrivacyBudgetExhaustedError

DELTA = 1e-5


def _epsilon(name, sigma, sample_rate, steps, delta=DELTA):
    return create_accountant(name).epsilon_after(delta, sigma, sample_rate, steps)


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_meets_the_budget_within_tolerance(name, target):
    sigma = calibrate_noise_multiplier(target, DELTA, 0.02, 500, accountant=name)
    assert target - 0.01 <= _epsilon(name, sigma, 0.02, 500) <= target


@pytest.mark.parametrize("name", ["rdp", "gdp"])
@pytest.mark.parametrize("target, sample_rate, steps", [(0.5, 0.001, 10_000), (3.0, 0.1, 50), (200.0, 0.02, 500),
                                                        (2.0, 1.0, 1), (10.0, 0.5, 2000)])
def test_guarantee_holds_across_regimes(name, target, sample_rate, steps):
    """σ from well below 1 (halving search) to well above (doubling search)."""
    sigma = calibrate_noise_multiplier(target, DELTA, sample_rate, steps, accountant=name, epsilon_tolerance=1e-3)
    assert target - 1e-3 <= _epsilon(name, sigma, sample_rate, steps) <= target


def test_tighter_tolerance_gives_smaller_sigma():
    loose = calibrate_noise_multiplier(2.0, DELTA, 0.01, 1000, accountant="rdp", epsilon_tolerance=0.5)
    tight = calibrate_noise_multiplier(2.0, DELTA, 0.01, 1000, accountant="rdp", epsilon_tolerance=1e-4)
    assert tight < loose
    assert 2.0 - 1e-4 <= _epsilon("rdp", tight, 0.01, 1000) <= 2.0


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_agrees_with_opacus_get_noise_multiplier(name):
    from opacus.accountants.utils import get_noise_multiplier

    ours = calibrate_noise_multiplier(4.0, DELTA, 0.01, 2000, accountant=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=0.01, steps=2000,
                                      accountant=name, epsilon_tolerance=0.01)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_unreachable_target_is_a_value_error():
    # σ = 1e4 over 10⁶ full-batch steps is one Gaussian mechanism with σ = 10: ε ≈ 0.5 > 0.01
    with pytest.raises(ValueError, match=r"`target_epsilon` must be reachable with noise_multiplier <= 10000, "
                                         r"got 0.01\. Even σ = 10000 spends ε = [\d.]+; raise the budget") as info:
        calibrate_noise_multiplier(0.01, DELTA, 1.0, 10**6, accountant="rdp")
    assert not isinstance(info.value, PrivacyBudgetExhaustedError)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"target_epsilon": 0.0}, ValueError, r"`target_epsilon` must be a finite number > 0, got 0.0\."),
        ({"target_epsilon": -1.0}, ValueError, r"`target_epsilon` must be a finite number > 0, got -1.0\."),
        ({"target_epsilon": float("nan")}, ValueError, r"`target_epsilon` must be a finite number > 0, got nan\."),
        ({"target_delta": 0.0}, ValueError, r"`target_delta` must be in \(0, 1\), got 0.0\."),
        ({"target_delta": 1.0}, ValueError, r"`target_delta` must be in \(0, 1\), got 1.0\."),
        ({"sample_rate": 0.0}, ValueError, r"`sample_rate` must be in \(0, 1\], got 0.0\."),
        ({"sample_rate": 1.5}, ValueError, r"`sample_rate` must be in \(0, 1\], got 1.5\."),
        ({"sample_rate": "0.1"}, TypeError, r"`sample_rate` must be a number, got 'str'\."),
        ({"steps": 0}, ValueError, r"`steps` must be an int >= 1, got 0\."),
        ({"steps": 10.0}, TypeError, r"`steps` must be an int, got 'float'\."),
        ({"epsilon_tolerance": 0.0}, ValueError, r"`epsilon_tolerance` must be a finite number > 0, got 0.0\."),
        ({"accountant": "moments"}, ValueError, r"`accountant` must be one of \['rdp', 'prv', 'gdp', 'pld'\], got 'moments'"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    args = {"target_epsilon": 1.0, "target_delta": DELTA, "sample_rate": 0.01, "steps": 100, "accountant": "rdp"}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        calibrate_noise_multiplier(**args)
