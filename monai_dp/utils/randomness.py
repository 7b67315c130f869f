"""Randomness of the DP mechanism: generators of its own, seeded from the operating system.

DP-SGD's guarantee rests on two random draws the adversary cannot predict: which items are sampled, and the
Gaussian noise. Both must therefore come from generators that no ``torch.manual_seed``, ``set_determinism``
or ``random.seed`` reaches. :func:`private_generator` makes such a generator, seeded from ``os.urandom`` (the
operating system's CSPRNG) unless a seed is given explicitly (for tests: the run is then reproducible, which
is logged as a WARNING and recorded, since anyone who knows the seed can replay the noise).
"""

from __future__ import annotations

import os

import torch

__all__ = ["REPRODUCIBLE_NOISE_WARNING", "gaussian_noise", "os_seed", "private_generator"]

REPRODUCIBLE_NOISE_WARNING = "reproducible noise: not private against someone who knows the seed"


def os_seed() -> int:
    """64 bits from the operating system's CSPRNG, as a seed ``torch.Generator.manual_seed`` accepts."""
    return int.from_bytes(os.urandom(8), "little")


def private_generator(device: str | torch.device = "cpu", seed: int | None = None) -> torch.Generator:
    """A generator on ``device`` of its own: seeded with ``seed``, or with :func:`os_seed` when ``None``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(os_seed() if seed is None else int(seed))
    return gen


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator, secure: bool = False
                   ) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` shaped like ``reference``, from ``generator``.

    ``secure=True`` returns ``(z1 + z2 + z3 + z4) / 2`` of four standard draws, which has the same
    distribution but closes the floating-point attacks on a single Gaussian sample (Holohan and Braghin 2021,
    as Opacus' ``secure_mode``); the caller reseeds ``generator`` from the OS before every step.
    """
    def draw() -> torch.Tensor:
        return torch.normal(0.0, float(std), size=reference.shape, generator=generator, device=reference.device,
                            dtype=reference.dtype)

    if not std > 0:
        return torch.zeros_like(reference)
    if not secure:
        return draw()
    total = draw()
    for _ in range(3):
        total += draw()
    return total / 2
