"""A fixed 2D wavelet scattering transform (Mallat 2012; Bruna & Mallat 2013) as DP-free hand-crafted features.

Tramèr & Boneh ("Differentially private learning needs better features (or much more data)", ICLR 2021)
showed that a linear model or small CNN trained with DP-SGD on scattering features beats end-to-end DP
CNNs on small image data sets: the features cost no privacy (nothing is learnt from the data), and the
model that DP-SGD must train is small, so the noise hurts less.

The transform here is the standard second-order one with Morlet wavelets at ``J`` scales and ``L``
orientations: ``S0 = x * phi``, ``S1 = |x * psi_l1| * phi``, ``S2 = ||x * psi_l1| * psi_l2| * phi`` for
``j2 > j1``, all subsampled by ``2**J``; ``1 + J L + L**2 J (J - 1) / 2`` channels per input channel
(81 for ``J = 2, L = 8``). Filters are built in the spatial domain, periodised, and applied by FFT on a
reflect-padded image. It is deterministic, has no trainable parameters and runs on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monai_dp.utils.validation import error_message

__all__ = ["WaveletScattering2D", "gaussian_2d", "morlet_2d"]


def _grid(m: int, n: int, periods: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of an ``m x n`` grid and its periodic copies: ``(2p+1, 2p+1, m, n)`` each."""
    offs = torch.arange(-periods, periods + 1, dtype=torch.float64)
    u = torch.arange(m, dtype=torch.float64)[:, None] + offs[:, None, None, None] * m
    v = torch.arange(n, dtype=torch.float64)[None, :] + offs[None, :, None, None] * n
    return u.expand(-1, 2 * periods + 1, m, n), v.expand(2 * periods + 1, -1, m, n)


def _gabor(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """Periodised Gabor filter on an ``m x n`` grid, centred at the origin (complex128)."""
    u, v = _grid(m, n)
    c, s = math.cos(theta), math.sin(theta)
    along, across = c * u + s * v, -s * u + c * v  # coordinates along / across the wave direction
    envelope = torch.exp(-(along**2 + (slant * across) ** 2) / (2 * sigma**2))
    wave = torch.exp(1j * xi * along)
    return (envelope * wave).sum((0, 1)) * (slant / (2 * math.pi * sigma**2))


def morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """Morlet wavelet: a Gabor filter minus a multiple of its envelope, so that it sums to exactly zero."""
    gabor = _gabor(m, n, sigma, theta, xi, slant)
    envelope = _gabor(m, n, sigma, theta, 0.0, slant)
    return gabor - (gabor.sum() / envelope.sum()) * envelope


def gaussian_2d(m: int, n: int, sigma: float) -> torch.Tensor:
    """Periodised isotropic Gaussian low-pass filter that sums to one (float64)."""
    g = _gabor(m, n, sigma, 0.0, 0.0, 1.0).real
    return g / g.sum()


class WaveletScattering2D(nn.Module):
    """Second-order 2D scattering transform: ``(B, C, H, W)`` -> ``(B, C * K, H / 2**J, W / 2**J)``.

    Args:
        shape: input ``(H, W)``; both must be divisible by ``2**J``.
        J: number of dyadic scales (the output is subsampled by ``2**J``).
        L: number of orientations in ``[0, pi)``.
        sigma0: width of the finest wavelet's envelope (scale ``j`` uses ``sigma0 * 2**j``).
    """

    def __init__(self, shape: tuple[int, int] | list[int], J: int = 2, L: int = 8, sigma0: float = 0.8) -> None:
        super().__init__()
        if not (isinstance(J, int) and J >= 1):
            raise ValueError(error_message("J", "an integer >= 1", J))
        if not (isinstance(L, int) and L >= 1):
            raise ValueError(error_message("L", "an integer >= 1", L))
        h, w = (int(s) for s in shape)
        if h % 2**J or w % 2**J:
            raise ValueError(error_message("shape", f"divisible by 2**J = {2**J}", tuple(shape),
                                           "Crop or pad the images (e.g. 28 x 28 works with J = 2)."))
        self.shape, self.J, self.L = (h, w), J, L
        self.pad = 2**J  # reflect padding against wrap-around of the circular convolution
        m, n = h + 2 * self.pad, w + 2 * self.pad
        psi = [morlet_2d(m, n, sigma0 * 2**j, math.pi * ell / L, 3 * math.pi / 4 / 2**j, 4.0 / L)
               for j in range(J) for ell in range(L)]
        self.register_buffer("psi_hat", torch.fft.fft2(torch.stack(psi)).to(torch.complex64), persistent=False)
        phi = gaussian_2d(m, n, sigma0 * 2**J)
        self.register_buffer("phi_hat", torch.fft.fft2(phi).to(torch.complex64), persistent=False)

    @property
    def num_channels(self) -> int:
        """Output channels per input channel."""
        return 1 + self.J * self.L + self.L**2 * self.J * (self.J - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.shape:
            raise ValueError(error_message("input", f"a (B, C, {self.shape[0]}, {self.shape[1]}) tensor",
                                           tuple(x.shape)))
        b, c = x.shape[:2]
        p, J, L = self.pad, self.J, self.L
        xp = F.pad(x.float().reshape(b * c, 1, *self.shape), (p, p, p, p), mode="reflect")[:, 0]
        x_hat = torch.fft.fft2(xp)  # (N, m, n)
        u1_hat = torch.fft.fft2(torch.fft.ifft2(x_hat[:, None] * self.psi_hat).abs())  # (N, J L, m, n)
        outputs = [self._low(x_hat, 1)[:, None], self._low(u1_hat, 1)]
        for j1 in range(J - 1):
            for j2 in range(j1 + 1, J):
                first = u1_hat[:, j1 * L : (j1 + 1) * L, None]  # (N, L, 1, m, n)
                second = self.psi_hat[j2 * L : (j2 + 1) * L][None, None]  # (1, 1, L, m, n)
                # |x * psi_j1| * psi_j2 varies at scale 2**j2: its modulus is sampled exactly at stride 2**j2
                u2 = torch.fft.ifft2(_fold(first * second, 2**j2)).abs()
                outputs.append(self._low(torch.fft.fft2(u2), 2**j2).flatten(1, 2))
        out = torch.cat(outputs, 1)
        return out.reshape(b, c * out.shape[1], *out.shape[2:]).to(x.dtype if x.is_floating_point() else out.dtype)

    def _low(self, z_hat: torch.Tensor, stride: int) -> torch.Tensor:
        """Low-pass ``phi`` of a signal sampled at ``stride``, subsampled to ``2**J`` and cropped (spectra in)."""
        step = 2**self.J
        phi_hat = _fold(self.phi_hat, stride) * stride**2  # phi sampled at the signal's stride, mass kept
        out = torch.fft.ifft2(_fold(z_hat * phi_hat, step // stride)).real
        p = self.pad // step
        return out[..., p : p + self.shape[0] // step, p : p + self.shape[1] // step]


def _fold(z_hat: torch.Tensor, s: int) -> torch.Tensor:
    """Spectrum of ``z[..., ::s, ::s]`` from the spectrum of ``z`` (aliasing by periodisation)."""
    if s == 1:
        return z_hat
    m, n = z_hat.shape[-2:]
    return z_hat.reshape(*z_hat.shape[:-2], s, m // s, s, n // s).sum((-4, -2)) / (s * s)
