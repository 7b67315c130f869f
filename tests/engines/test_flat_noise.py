"""The DP optimizer's flat noise draw (``flat_noise``, the default): one Gaussian draw over all parameters of a step.

The statistics are checked on the parameters' update after one noise-only step (clipped sum zero, lr 1): each
coordinate must move by N(0, (σC/B)²), independently of the others (no tensor left without noise, no noise reused
across tensors or steps), from the optimizer's own generator (reproducible when seeded, untouched by torch's
global seed), plain and in ``secure_mode``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer
from monai_dp.utils.randomness import SecureGaussian

SIGMA, CLIP, BATCH = 1.3, 0.7, 4
SHAPES = [(3,), (40, 50), (2000,), (10, 10, 20)]  # a tiny tensor first, three with >= 2000 coordinates


def _noise(generator, steps: int = 1, secure: bool = False) -> list[list[torch.Tensor]]:
    """The update of each parameter in each of ``steps`` noise-only steps (zero clipped sum, lr 1)."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = PrivateNoiseDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                  expected_batch_size=BATCH, generator=generator, secure_mode=secure)
    assert opt.flat_noise
    out = []
    for _ in range(steps):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape))
        opt.step()
        out.append([(b - p.detach()).flatten() for b, p in zip(before, params)])
        opt.zero_grad()
    return out


@pytest.mark.parametrize("secure", [False, True], ids=["private generator", "secure_mode"])
def test_every_coordinate_gets_independent_noise_of_std_sigma_clip_over_batch(secure):
    generator = SecureGaussian() if secure else torch.Generator().manual_seed(3)
    steps = _noise(generator, steps=2, secure=secure)
    std = SIGMA * CLIP / BATCH
    for noise in steps[0]:
        n = noise.numel()
        assert float(noise.abs().min()) > 0  # every coordinate is noised, the tiny tensor too
        if n < 2000:
            continue
        # sample mean within 5 standard errors; sample std within 6 of its standard errors (1/sqrt(2n)): x sqrt(2),
        # x 1/sqrt(2) or a missing 1/B are far outside
        assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
        assert abs(float(noise.std()) / std - 1) < 6 / math.sqrt(2 * n)
    # independence: no tensor's noise repeats another's (over their common length), nor last step's
    pairs = itertools.combinations(steps[0], 2)
    across_steps = zip(steps[0], steps[1])
    for a, b in itertools.chain(pairs, across_steps):
        m = min(a.numel(), b.numel())
        if m < 2000:
            continue
        corr = torch.corrcoef(torch.stack([a[:m], b[:m]]))[0, 1]
        assert abs(float(corr)) < 5 / math.sqrt(m)


def test_seeded_noise_is_reproducible_and_comes_from_the_optimizer_generator_only():
    torch.manual_seed(0)
    first = _noise(torch.Generator().manual_seed(11))[0]
    torch.manual_seed(1)  # torch's global seed does not reach the noise
    again = _noise(torch.Generator().manual_seed(11))[0]
    other = _noise(torch.Generator().manual_seed(12))[0]
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # known answer: one flat draw of all coordinates from the optimizer's generator, split in parameter order
    sizes = [math.prod(s) for s in SHAPES]
    flat = torch.normal(0.0, SIGMA * CLIP, size=(sum(sizes),), generator=torch.Generator().manual_seed(11))
    for got, z in zip(first, flat.split(sizes)):
        torch.testing.assert_close(got, z / BATCH)


def test_secure_mode_draws_in_bounded_chunks(monkeypatch):
    """Above the chunk size the secure stream is drawn in pieces; every coordinate is still noised."""
    import monai_dp.engines.optimizer as module

    monkeypatch.setattr(module, "_SECURE_CHUNK", 1000)
    calls = []
    real = SecureGaussian.standard_normal

    def spy(self, n, device="cpu"):
        calls.append(n)
        return real(self, n, device)

    monkeypatch.setattr(SecureGaussian, "standard_normal", spy)
    noise = _noise(SecureGaussian(), secure=True)[0]
    total = sum(math.prod(s) for s in SHAPES)
    assert max(calls) <= 1000 and sum(calls) == total
    assert all(float(z.abs().min()) > 0 for z in noise)
