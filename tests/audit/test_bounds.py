"""Bounds on attacks implied by the guarantee: against closed forms for the Gaussian mechanism, and known values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from monai_dp.audit import gdp_reconstruction_bound, single_point_curve, tradeoff_curve
from monai_dp.privacy import Mechanism


def test_full_curve_is_far_tighter_than_a_single_point():
    """The issue's reference: q = 0.01, σ = 1, T = 10 000: AUC ≤ 0.82 from the curve, 0.998 from ε = 6.19."""
    assert tradeoff_curve([Mechanism(1.0, 0.01, 10_000)]).auc_bound() == pytest.approx(0.82, abs=0.005)
    assert single_point_curve(6.19, 1e-5).auc_bound() == pytest.approx(0.998, abs=0.001)


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_gaussian_mechanism_matches_closed_form(sigma):
    """One unsampled Gaussian step is exactly μ-GDP with μ = 1/σ: f(α) = Φ(Φ⁻¹(1−α) − μ), AUC = Φ(μ/√2)."""
    mu = 1.0 / sigma
    curve = tradeoff_curve([Mechanism(sigma, 1.0, 1)])
    alphas = np.array([1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5])
    exact_tpr = norm.cdf(norm.ppf(alphas) + mu)
    got = curve.tpr_bound(alphas)
    assert np.all(got >= exact_tpr - 1e-6), "a bound must not be below the true trade-off"
    np.testing.assert_allclose(got, exact_tpr, atol=5e-3)
    assert curve.auc_bound() == pytest.approx(norm.cdf(mu / np.sqrt(2)), abs=3e-3)
    for kappa in (0.001, 0.1):
        rero = curve.reconstruction_bound(kappa)
        assert rero == pytest.approx(gdp_reconstruction_bound(mu, kappa), abs=5e-3)
        assert rero >= kappa


def test_an_optimal_attack_on_the_mechanism_stays_under_the_bound():
    """Simulate the likelihood-ratio attack on one subsampled Gaussian mechanism run; its TPR at FPR stays below."""
    rng = np.random.default_rng(0)
    sigma, q, steps = 1.0, 0.2, 20
    n = 200_000
    # observations: sum over steps of noise (+1 when the target was sampled, members only)
    out = rng.normal(0, sigma, (n, steps))
    member = out + (rng.random((n, steps)) < q)
    def llr(x):  # exact log-likelihood ratio of the mixture against pure noise, summed over steps
        return np.log(q * np.exp((2 * x - 1) / (2 * sigma**2)) + 1 - q).sum(axis=1)
    s_in, s_out = llr(member), llr(out)
    curve = tradeoff_curve([Mechanism(sigma, q, steps)])
    for fpr in (0.01, 0.1):
        threshold = np.quantile(s_out, 1 - fpr)
        tpr = float((s_in > threshold).mean())
        assert tpr <= curve.tpr_bound(fpr)[0] + 3 * np.sqrt(tpr * (1 - tpr) / n)
        assert tpr > 0.5 * curve.tpr_bound(fpr)[0], "the bound should be reasonably tight for the optimal attack"


def test_bounds_grow_with_steps_and_bad_input():
    small, large = (tradeoff_curve([Mechanism(1.0, 0.01, n)]).auc_bound() for n in (100, 3000))
    assert 0.5 < small < large < 1.0
    with pytest.raises(ValueError, match=r"`kappa` must be"):
        single_point_curve(1.0, 1e-5).reconstruction_bound(0.0)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got 1.5"):
        single_point_curve(1.0, 1e-5).tpr_bound(1.5)
