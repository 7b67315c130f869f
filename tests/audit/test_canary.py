"""Self-audit of the real training path with Dirac canaries: μ̂ = √T/σ, bugs are caught, ε is never exceeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monai_dp.audit.canary import dirac_canary_scores, empirical_epsilon, estimate_mu
from monai_dp.privacy import create_accountant

N, T, SIGMA = 120, 4, 1.0


def test_correct_run_matches_mu_and_stays_under_the_claimed_epsilon():
    a, b = dirac_canary_scores(N, steps=T, noise_multiplier=SIGMA)
    mu, se = estimate_mu(a, b)
    assert abs(mu - math.sqrt(T) / SIGMA) < 4 * se
    acc = create_accountant("prv")
    acc.step(SIGMA, 1.0, T)
    claimed = acc.get_epsilon(1e-5)
    assert empirical_epsilon(a, b, delta=1e-5) <= claimed


def test_halved_noise_is_caught():
    def halve(trainer):
        trainer.optimizer.noise_multiplier = trainer.optimizer.noise_multiplier / 2

    a, b = dirac_canary_scores(N, steps=T, noise_multiplier=SIGMA, mutate=halve)
    mu, se = estimate_mu(a, b)
    assert mu - math.sqrt(T) / SIGMA > 4 * se, "a σ/2 bug must show in μ̂"


def drop_noise(trainer):
    """A bug that drops the noise (σ = 0 set on the optimizer is refused by the trainer, so patch the step)."""
    opt = trainer.optimizer

    def add_noise():
        for p in opt.params:
            p.grad = p.summed_grad.view_as(p)

    opt.add_noise = add_noise


def test_without_noise_the_audit_reaches_its_cap():
    a, b = dirac_canary_scores(40, steps=T, noise_multiplier=SIGMA, mutate=drop_noise)
    np.testing.assert_allclose(a, T, rtol=1e-5)
    np.testing.assert_allclose(b, 0.0, atol=1e-6)
    cap = math.log((1 - 0.025 ** (1 / 40)) ** -1 * 0.025 ** (1 / 40))  # CP with no errors at 95 %
    assert empirical_epsilon(a, b) == pytest.approx(cap, rel=1e-3)
    assert cap < math.log(40)


@pytest.mark.parametrize("unit, shift", [("patient", 1), ("record", 3)])
def test_three_aligned_records_of_one_patient(unit, shift):
    """Patient-level clipping: three aligned canary records move the sum by C, not 3 C."""
    a, b = dirac_canary_scores(60, steps=T, noise_multiplier=SIGMA, canary_records=3, unit=unit)
    assert (a.mean() - b.mean()) / T == pytest.approx(shift, abs=0.35 * shift + 0.35)
    mu, se = estimate_mu(a, b)
    assert abs(mu - shift * math.sqrt(T) / SIGMA) < 4 * se


def _noise_for_the_mean(trainer):
    """A normalisation bug: noise calibrated to the averaged gradient (σC/B) but added to the sum."""
    opt = trainer.optimizer
    real = opt.add_noise

    def add_noise():
        saved = opt.noise_multiplier
        opt.noise_multiplier = saved / opt.expected_batch_size
        try:
            real()
        finally:
            opt.noise_multiplier = saved

    opt.add_noise = add_noise


def test_wrong_noise_normalisation_is_caught():
    a, b = dirac_canary_scores(N, steps=T, noise_multiplier=SIGMA, mutate=_noise_for_the_mean)
    mu, se = estimate_mu(a, b)
    assert mu - math.sqrt(T) / SIGMA > 4 * se, "noise divided by the batch size must show in μ̂"


def test_scores_without_spread_give_an_infinite_mu_without_dividing_by_zero():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning: the zero spread is handled, not divided by
        assert estimate_mu(np.full(40, float(T)), np.zeros(40)) == (math.inf, math.inf)
        assert estimate_mu(np.zeros(5), np.full(5, 2.0)) == (-math.inf, math.inf)
        assert estimate_mu(np.ones(5), np.ones(5)) == (0.0, math.inf)
    with pytest.raises(ValueError, match="at least 2 scores each"):
        estimate_mu([1.0], [0.0, 1.0])
