"""Distributed noise for secure aggregation: the shares, the clipping, the calibration and the accounting (against
dp-accounting's PLD and the central DP-FedAvg mechanism at q = 1), the CKKS precision."""

from __future__ import annotations

import math

import pytest
import torch

from monai_dp.fl.client_level import ClientLevelDP
from monai_dp.fl.secure import DistributedNoise, measure_ckks_error
from tests.fl.tiny import pld_epsilon

DELTA = 1e-5


def test_any_t_shares_add_up_to_the_central_noise():
    n, t, sigma, clip, d = 5, 3, 1.3, 0.4, 200_000
    shares = [DistributedNoise(n, clip, sigma, min_sites=t, noise_seed=i).privatize({"w": torch.zeros(d)})[0]["w"]
              for i in range(n)]
    assert float(shares[0].std()) == pytest.approx(sigma * clip / math.sqrt(t), rel=0.01)
    assert float(sum(shares[:t]).std()) == pytest.approx(sigma * clip, rel=0.01)  # t survivors: exactly σC
    assert float(sum(shares).std()) == pytest.approx(sigma * clip * math.sqrt(n / t), rel=0.01)  # more: more noise
    default = DistributedNoise(n, clip, sigma)  # t defaults to n
    assert default.min_sites == n and default.share_std == pytest.approx(sigma * clip / math.sqrt(n), rel=1e-12)


def test_the_update_is_clipped_as_one_vector_before_the_share_is_added():
    update = {"a": torch.full((3, 4), 2.0), "b": torch.full((5,), -1.0)}
    norm = math.sqrt(12 * 4 + 5)
    for clip in (0.5, 100.0):
        noised, got_norm = DistributedNoise(3, clip, 0.8, noise_seed=7).privatize(update)
        noise_only, _ = DistributedNoise(3, clip, 0.8, noise_seed=7).privatize({k: torch.zeros_like(v)
                                                                                 for k, v in update.items()})
        signal = torch.cat([(noised[k] - noise_only[k]).reshape(-1) for k in update])
        assert got_norm == pytest.approx(norm, rel=1e-12)
        assert float(signal.norm()) == pytest.approx(min(norm, clip), rel=1e-9)
        assert list(noised) == ["a", "b"] and all(v.dtype == torch.float64 for v in noised.values())


def test_sigma_is_calibrated_for_the_target_over_the_rounds_at_sampling_rate_one():
    noise = DistributedNoise(4, 0.1, target_epsilon=3.0, num_rounds=10, min_sites=2, target_delta=DELTA)
    sigma = noise.noise_multiplier
    assert pld_epsilon(sigma, 1.0, 10, DELTA) <= 3.0 * 1.02
    assert pld_epsilon(sigma * 0.97, 1.0, 10, DELTA) > 3.0  # not over-noised: 3 % less σ exceeds the target
    for _ in range(10):
        assert noise.allows_round()
        noise.record_round()
    assert not noise.allows_round()


def test_the_accounting_is_the_central_mechanism_and_the_pld():
    sigma, clip, rounds = 1.1, 0.2, 7
    noise = DistributedNoise(5, clip, sigma, min_sites=3, target_delta=DELTA)
    central = ClientLevelDP(5, 1.0, clip, sigma, target_delta=DELTA)
    assert noise.get_epsilon() == 0.0 and noise.individual_epsilon() == 0.0
    for r in range(1, rounds + 1):
        noise.record_round()
        central.record_round()
        if r in (1, rounds):
            assert noise.get_epsilon() == pytest.approx(central.get_epsilon(), rel=1e-12)
    assert noise.get_epsilon() == pytest.approx(pld_epsilon(sigma, 1.0, rounds, DELTA), rel=0.02)
    assert noise.individual_epsilon() == pytest.approx(pld_epsilon(sigma / math.sqrt(3), 1.0, rounds, DELTA), rel=0.02)
    report = noise.report()
    assert report["rounds"] == rounds and report["min_sites"] == 3 and report["coalition_bound"] is None
    assert "at most k_min - 3 of the 5 sites" in report["guarantee"]  # a site does not know how many were summed
    restored = DistributedNoise(5, clip, sigma, min_sites=3, target_delta=DELTA)
    restored.load_state_dict(noise.state_dict())
    assert restored.get_epsilon() == noise.get_epsilon()
    assert restored.individual_epsilon() == noise.individual_epsilon()


def test_the_ckks_error_enters_as_a_larger_sensitivity():
    sigma, clip, d, eta = 1.0, 0.05, 10_000, 1e-5
    noise = DistributedNoise(3, clip, sigma, target_delta=DELTA)
    for _ in range(3):
        noise.record_round()
    sensitivity, eps = noise.epsilon_with_error(d, eta)
    assert sensitivity == pytest.approx(clip + 2 * eta * math.sqrt(d), rel=1e-12)
    assert eps == pytest.approx(pld_epsilon(sigma * clip / sensitivity, 1.0, 3, DELTA), rel=0.02)
    assert eps > noise.get_epsilon()
    assert noise.epsilon_with_error(d, 0.0) == (clip, pytest.approx(noise.get_epsilon(), rel=1e-12))
    assert noise.report(d, eta)["ckks"]["epsilon"] == eps


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"`min_sites` must be an int in \[1, num_sites=3\], got 4"):
        DistributedNoise(3, 1.0, 1.0, min_sites=4)
    with pytest.raises(ValueError, match=r"`min_sites` must be an int in \[1, num_sites=3\], got 0"):
        DistributedNoise(3, 1.0, 1.0, min_sites=0)
    with pytest.raises(ValueError, match=r"`num_sites` must be an int >= 1, got 0"):
        DistributedNoise(0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be a number > 0, got 0.0"):
        DistributedNoise(3, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"`ckks_error` must be a finite number >= 0, got nan"):
        DistributedNoise(3, 1.0, 1.0).epsilon_with_error(10, float("nan"))


def test_the_measured_ckks_error_bounds_a_sum_of_encrypted_vectors():
    ts = pytest.importorskip("tenseal", reason="secure aggregation needs TenSEAL: pip install 'monai_dp[he]'")
    pytest.importorskip("nvflare", reason="the contexts are made by NVFlare's HEBuilder: pip install 'monai_dp[fl]'")
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()
    builder.initialize(None, None)
    context = ts.context_from(builder.get_serialized_context(is_client=True))
    bound = measure_ckks_error(context, 3, num_values=4096, value_std=0.1, trials=2)
    assert 0 < bound < 1e-4
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(4096, generator=gen, dtype=torch.float64) * 0.1 for _ in range(3)]
    total = sum(ts.ckks_vector(context, v.tolist()) for v in values[1:]) + ts.ckks_vector(context, values[0].tolist())
    error = (torch.tensor(total.decrypt(), dtype=torch.float64) - sum(values)).abs().max()
    assert float(error) <= bound
