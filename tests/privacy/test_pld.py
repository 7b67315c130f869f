"""PLD accounting: known answers, the tight patient-level conversion of record-level runs, the group formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from monai_dp.privacy import (
    Mechanism,
    compose_epsilon,
    create_accountant,
    group_privacy_epsilon,
    max_steps_within_budget,
    patient_level_epsilon,
)

DELTA = 1e-5


@pytest.mark.parametrize("q, sigma, steps, rdp_ref, pld_ref", [
    (0.01, 1.0, 10_000, 6.713, 6.188),
    (256 / 60000, 1.1, 14_063, 2.597, 2.382),
    (0.01, 4.0, 40_000, 2.210, 2.033),
])
def test_known_answers_rdp_and_pld(q, sigma, steps, rdp_ref, pld_ref):
    pld, rdp, prv = (create_accountant(n) for n in ("pld", "rdp", "prv"))
    for acc in (pld, rdp, prv):
        acc.step(sigma, q, steps)
    assert pld.get_epsilon(DELTA) == pytest.approx(pld_ref, abs=2e-3)
    assert rdp.get_epsilon(DELTA) == pytest.approx(rdp_ref, abs=2e-3)
    # PRV and PLD are both tight: they agree within PRV's error bracket (RDP's ~9 % looseness is pinned by the
    # two reference values above)
    assert prv.get_epsilon(DELTA) == pytest.approx(pld.get_epsilon(DELTA), abs=0.03)


@pytest.mark.parametrize("k, tight, loose", [(1, 8.41, 9.19), (2, 19.9, 29.0), (4, 50.7, 161.0), (8, 141.0, math.inf)])
def test_patient_level_guarantee_of_record_level_run(k, tight, loose):
    """Reference values of the issue: q = 0.032, σ = 1, T = 1563, δ = 1e-5."""
    eps = patient_level_epsilon(1.0, 0.032, 1563, k, DELTA)
    assert eps == pytest.approx(tight, rel=5e-3)
    group = group_privacy_epsilon(1.0, 0.032, 1563, k, DELTA)
    if math.isinf(loose):
        assert math.isinf(group)
    else:
        assert group == pytest.approx(loose, rel=5e-3)
        assert eps <= group


def _mixture_delta(eps: float, sigma: float, q: float, k: int) -> float:
    """Hockey-stick divergence of one step, computed by numerical integration (independent of dp_accounting).

    Remove-adjacency pair: P = Σ_j Bin(j; k, q) N(j, σ²) against Q = N(0, σ²), both directions; returns the max.
    """
    x = np.linspace(-12 * sigma - 1, k + 12 * sigma + 1, 400_001)
    dx = x[1] - x[0]
    weights = stats.binom.pmf(np.arange(k + 1), k, q)
    p = sum(w * stats.norm.pdf(x, j, sigma) for j, w in enumerate(weights))
    qd = stats.norm.pdf(x, 0, sigma)
    return max(np.sum(np.maximum(p - math.exp(eps) * qd, 0)) * dx, np.sum(np.maximum(qd - math.exp(eps) * p, 0)) * dx)


@pytest.mark.parametrize("k", [2, 3])
def test_single_step_mixture_matches_numerical_integration(k):
    sigma, q = 0.8, 0.3
    for delta in (1e-2, 1e-3):
        eps = compose_epsilon([Mechanism(sigma, q, 1, k)], delta)
        # ε is an upper bound (pessimistic discretisation): at that ε the true δ is at most the target ...
        assert _mixture_delta(eps, sigma, q, k) <= delta * 1.001
        # ... and it is tight: slightly below ε the true δ already exceeds the target
        assert _mixture_delta(eps - 0.02, sigma, q, k) > delta


def test_group_of_one_is_the_record_level_mechanism():
    a = create_accountant("pld")
    a.step(1.0, 0.02, 500)
    assert patient_level_epsilon(1.0, 0.02, 500, 1, DELTA) == pytest.approx(a.get_epsilon(DELTA), abs=1e-9)


def test_heterogeneous_composition_is_tighter_than_the_sum():
    runs = [Mechanism(1.0, 0.02, 400), Mechanism(2.0, 0.05, 300)]
    total = compose_epsilon(runs, DELTA)
    parts = [compose_epsilon([r], DELTA) for r in runs]
    assert max(parts) < total < sum(parts)
    acc = create_accountant("pld")
    for r in runs:
        acc.step(r.noise_multiplier, r.sample_rate, r.steps)
    assert acc.get_epsilon(DELTA) == pytest.approx(total, abs=1e-9)


def test_max_steps_within_budget_is_the_boundary():
    spent = [Mechanism(1.0, 0.02, 300)]
    n = max_steps_within_budget(spent, 1.2, 0.02, 1, 3.0, DELTA, limit=3000)
    assert 0 < n < 3000
    assert compose_epsilon([*spent, Mechanism(1.2, 0.02, n)], DELTA) <= 3.0
    assert compose_epsilon([*spent, Mechanism(1.2, 0.02, n + 1)], DELTA) > 3.0
    assert max_steps_within_budget(spent, 1.2, 0.02, 1, 0.5, DELTA, limit=100) == 0
    assert max_steps_within_budget([], 1.2, 0.02, 1, 3.0, DELTA, limit=7) == 7


def test_zero_steps_and_zero_noise():
    assert compose_epsilon([], DELTA) == 0.0
    assert compose_epsilon([Mechanism(1.0, 0.1, 0)], DELTA) == 0.0
    assert math.isinf(compose_epsilon([Mechanism(0.0, 0.1, 3)], DELTA))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`group_size` must be an int >= 1, got 0"):
        compose_epsilon([Mechanism(1.0, 0.1, 3, 0)], DELTA)
    with pytest.raises(ValueError, match=r"`sample_rate` must be in \(0, 1\], got 1.5"):
        patient_level_epsilon(1.0, 1.5, 3, 2, DELTA)
    with pytest.raises(ValueError, match=r"`delta` must be"):
        compose_epsilon([Mechanism(1.0, 0.1, 3)], 0.0)
