"""Client-level DP (DP-FedAvg): the server's noisy aggregate, its sensitivity to one site, its accounting."""

from __future__ import annotations

import pytest
import torch

from monai_dp.fl.client_level import ClientLevelDP
from tests.fl.tiny import pld_epsilon

TEMPLATE = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def _updates(seed: int, n: int, scale: float = 1.0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: scale * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in TEMPLATE.items()}
            for _ in range(n)]


def _plain_dp_fedavg(updates, clip, sigma, q, num_sites, seed):
    """DP-FedAvg written out: clip each update as one vector, sum, add N(0, σ²C²) per tensor (template order)
    from a generator seeded like the mechanism's, divide by the expected number of sites qK."""
    gen = torch.Generator().manual_seed(seed)
    gen_draws = torch.rand(num_sites, generator=gen)  # the mechanism samples sites first from the same generator
    del gen_draws
    out = {}
    flat = [torch.cat([u[k].reshape(-1) for k in TEMPLATE]) for u in updates]
    scaled = [f * min(1.0, clip / float(f.norm())) for f in flat]
    total = torch.stack(scaled).sum(0)
    offset = 0
    for name, ref in TEMPLATE.items():
        part = total[offset:offset + ref.numel()].reshape(ref.shape)
        offset += ref.numel()
        out[name] = (part + sigma * clip * torch.randn(ref.shape, generator=gen, dtype=torch.float64)) / (q * num_sites)
    return out


def test_the_noisy_aggregate_is_a_plainly_written_dp_fedavg_step():
    dp = ClientLevelDP(num_sites=10, sample_rate=0.5, clip_norm=0.7, noise_multiplier=1.3, noise_seed=11)
    sites = [f"site-{i}" for i in range(10)]
    sampled = dp.sample_sites(sites)
    updates = _updates(0, len(sampled), scale=2.0)  # norms well above the clip
    clipped = [dp.clip(u)[0] for u in updates]
    got = dp.aggregate(clipped, {k: v.double() for k, v in TEMPLATE.items()})
    want = _plain_dp_fedavg(updates, 0.7, 1.3, 0.5, 10, seed=11)
    for name in TEMPLATE:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(11)
    assert sampled == [s for s, u in zip(sites, torch.rand(10, generator=gen).tolist()) if u < 0.5]


def test_one_site_moves_the_aggregate_by_at_most_clip_over_q_k():
    clip, q, k = 0.5, 0.3, 20
    others = _updates(1, 5)
    for outlier_scale in (0.01, 1.0, 1e6):
        outlier = _updates(2, 1, scale=outlier_scale)[0]
        with_site, without = ClientLevelDP(k, q, clip, 1.0, noise_seed=3), ClientLevelDP(k, q, clip, 1.0, noise_seed=3)
        a = with_site.aggregate([with_site.clip(u)[0] for u in [*others, outlier]], TEMPLATE)
        b = without.aggregate([without.clip(u)[0] for u in others], TEMPLATE)
        diff = torch.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in TEMPLATE))
        norm = float(torch.sqrt(sum((v ** 2).sum() for v in outlier.values())))
        assert float(diff) <= clip / (q * k) * (1 + 1e-6)
        assert float(diff) == pytest.approx(min(norm, clip) / (q * k), rel=1e-5)


def test_rounds_are_accounted_like_the_pld_and_stop_at_the_budget():
    dp = ClientLevelDP(num_sites=50, sample_rate=0.2, clip_norm=1.0, target_epsilon=2.0, num_rounds=30,
                       target_delta=1e-5)
    rounds = 0
    while dp.allows_round():
        dp.record_round()
        rounds += 1
        assert rounds < 200
    assert 30 <= rounds <= 31  # σ calibrated for 30 rounds (within the calibration's tolerance)
    assert dp.get_epsilon() <= 2.0
    assert dp.get_epsilon() == pytest.approx(pld_epsilon(dp.noise_multiplier, 0.2, rounds, 1e-5), rel=0.02)
    assert pld_epsilon(dp.noise_multiplier, 0.2, rounds + 1, 1e-5) > 2.0 * 0.99


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"`sample_rate` must be in \(0, 1\], got 0"):
        ClientLevelDP(10, 0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be given, or target_epsilon and num_rounds"):
        ClientLevelDP(10, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be a number > 0, got 0.0. σ = 0 adds no noise"):
        ClientLevelDP(10, 0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"`update` must be finite"):
        ClientLevelDP(10, 0.5, 1.0, 1.0).clip({"w": torch.tensor([float("inf")])})
