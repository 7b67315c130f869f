"""One-run audit (Steinke, Nasr & Jagielski 2023): the p-value, the ε lower bound, and the real trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from monai_dp.audit.one_run import dirac_one_run_audit, one_run_epsilon, one_run_p_value
from monai_dp.privacy import create_accountant
from tests.audit.test_canary import drop_noise


def test_p_value_is_the_binomial_tail_at_delta_zero_and_grows_with_delta():
    q = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(100, 40, 30, 1.0) == pytest.approx(stats.binom.sf(29, 40, q))
    assert one_run_p_value(100, 40, 30, 1.0, 1e-4) > one_run_p_value(100, 40, 30, 1.0)
    assert one_run_p_value(100, 40, 30, 2.0) > one_run_p_value(100, 40, 30, 1.0)
    with pytest.raises(ValueError, match=r"`\(m, r, v\)` must be 0 <= v <= r <= m, got \(10, 5, 6\)"):
        one_run_p_value(10, 5, 6, 1.0)


def test_all_guesses_right_reaches_the_cap_and_chance_gives_zero():
    m, k = 200, 20
    scores = np.arange(m, dtype=float)
    included = scores >= m / 2  # the top half is in: every guess right
    res = one_run_epsilon(scores, included, k, k, confidence=0.95)
    assert res["correct"] == res["guesses"] == 2 * k
    q = 0.05 ** (1 / (2 * k))  # P[Bin(r, q) >= r] = q^r = 0.05
    assert res["epsilon_lower"] == pytest.approx(math.log(q / (1 - q)), rel=1e-4)
    rng = np.random.default_rng(0)
    chance = one_run_epsilon(rng.random(m), rng.random(m) < 0.5, k, k)
    assert chance["epsilon_lower"] < 0.5


def test_trainer_one_run_audit_respects_the_claimed_epsilon_and_catches_halved_noise():
    steps, sigma = 1, 4.0
    good = dirac_one_run_audit(m=1000, steps=steps, noise_multiplier=sigma, delta=1e-5, seed=1)
    assert abs(good["mu_hat"] - good["mu_claimed"]) < 4 * good["mu_se"]
    acc = create_accountant("prv")
    acc.step(sigma, 1.0, steps)
    assert good["epsilon_lower"] <= acc.get_epsilon(1e-5)

    def halve(trainer):
        trainer.optimizer.noise_multiplier /= 2

    bad = dirac_one_run_audit(m=1000, steps=steps, noise_multiplier=sigma, delta=1e-5, seed=1, mutate=halve)
    assert bad["mu_hat"] - bad["mu_claimed"] > 4 * bad["mu_se"]
    assert bad["epsilon_lower"] > good["epsilon_lower"]


def test_trainer_one_run_audit_without_noise_reaches_the_cap():
    res = dirac_one_run_audit(m=200, steps=1, noise_multiplier=4.0, mutate=drop_noise, seed=2)
    assert res["correct"] == res["guesses"] == 40
    q = 0.05 ** (1 / 40)
    assert res["epsilon_lower"] == pytest.approx(math.log(q / (1 - q)), rel=1e-4)
