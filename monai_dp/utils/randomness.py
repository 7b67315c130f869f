"""Randomness of the DP mechanism: generators of its own, seeded from the operating system.

DP-SGD's guarantee rests on two random draws the adversary cannot predict: which items are sampled, and the
Gaussian noise. Both must therefore come from generators that no ``torch.manual_seed``, ``set_determinism``
or ``random.seed`` reaches. :func:`private_generator` makes such a generator, seeded from ``os.urandom`` (the
operating system's CSPRNG) unless a seed is given explicitly (for tests: the run is then reproducible, which
is logged as a WARNING and recorded, since anyone who knows the seed can replay the noise).
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["REPRODUCIBLE_NOISE_WARNING", "SecureGaussian", "gaussian_noise", "os_seed", "private_generator"]

REPRODUCIBLE_NOISE_WARNING = "reproducible noise: not private against someone who knows the seed"


def os_seed() -> int:
    """64 bits from the operating system's CSPRNG, as a seed ``torch.Generator.manual_seed`` accepts."""
    return int.from_bytes(os.urandom(8), "little")


def private_generator(device: str | torch.device = "cpu", seed: int | None = None) -> torch.Generator:
    """A generator on ``device`` of its own: seeded with ``seed``, or with :func:`os_seed` when ``None``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(os_seed() if seed is None else int(seed))
    return gen


class SecureGaussian:
    """Standard Gaussian samples from a cryptographically secure stream, for ``secure_mode``.

    The bits come from AES-256 in counter mode (the ``cryptography`` package, OpenSSL) under a key and nonce of
    fresh ``os.urandom`` bytes, renewed by :meth:`reseed` (the DP optimizer calls it before every step). 53-bit
    uniforms in (0, 1) become Gaussians by the Box-Muller transform in float64, and each returned sample is
    ``(z1 + z2 + z3 + z4) / 2`` of four of them: the same N(0, 1) distribution, robust to the floating-point
    attacks on a single Gaussian sample (Holohan and Braghin 2021; the construction of Opacus' secure mode).
    Unlike torch's generators (Mersenne Twister on CPU, Philox on CUDA), the stream's outputs reveal nothing
    about each other: knowing the noise of some coordinates (an adversary who knows the other records' gradients
    can compute it) does not help predict the rest.
    """

    def __init__(self) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        except ImportError as err:  # pragma: no cover - the "secure" extra is part of the test install
            raise ImportError("secure_mode=True needs the `cryptography` package: pip install 'monai_dp[secure]'."
                              ) from err
        self._cipher = (Cipher, algorithms.AES, modes.CTR)
        self._stream = None
        self.reseed()

    def reseed(self) -> None:
        """A new key and nonce from the operating system's CSPRNG."""
        cipher, aes, ctr = self._cipher
        self._stream = cipher(aes(os.urandom(32)), ctr(os.urandom(16))).encryptor()

    def _uniforms(self, n: int, device: torch.device) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self._stream.update(bytes(8 * n))), dtype=torch.int64).to(device)
        return words.bitwise_and_((1 << 53) - 1).to(torch.float64).add_(0.5).mul_(2.0**-53)  # in (0, 1), never 0

    def standard_normal(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """``n`` float64 samples of N(0, 1) on ``device``, each the scaled sum of four Box-Muller draws.

        Only the bits come from the CPU; the transform runs on ``device`` (fast on a GPU)."""
        device = torch.device(device)
        pairs = 2 * n  # four draws per sample, two draws per pair of uniforms
        radius = self._uniforms(pairs, device).log_().mul_(-2.0).sqrt_()
        angle = self._uniforms(pairs, device).mul_(2.0 * math.pi)
        z = torch.cos(angle).mul_(radius).view(2, n).sum(0)
        z += angle.sin_().mul_(radius).view(2, n).sum(0)
        return z.mul_(0.5)


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator | SecureGaussian) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` shaped like ``reference``, from ``generator``.

    A ``torch.Generator`` draws on the reference's device; a :class:`SecureGaussian` takes its bits from the CPU
    and transforms them in float64 on the reference's device, then casts to its dtype.
    """
    if not std > 0:
        return torch.zeros_like(reference)
    if isinstance(generator, SecureGaussian):
        z = generator.standard_normal(reference.numel(), reference.device).view(reference.shape).mul_(float(std))
        return z.to(dtype=reference.dtype)
    return torch.normal(0.0, float(std), size=reference.shape, generator=generator, device=reference.device,
                        dtype=reference.dtype)
