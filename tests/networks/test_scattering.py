"""The scattering transform against a direct spatial computation, and the feature classifier head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monai_dp.networks import FeatureClassifier, WaveletScattering2D
from monai_dp.networks.scattering import gaussian_2d, morlet_2d


def _circular_conv(img: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Direct circular convolution ``sum_u img[x - u] filt[u]`` (slow, independent of the FFT)."""
    m, n = img.shape
    out = torch.zeros(m, n, dtype=torch.complex128)
    for u in range(m):
        for v in range(n):
            if abs(filt[u, v]) > 1e-12:
                out += filt[u, v] * torch.roll(img, shifts=(u, v), dims=(0, 1))
    return out


def test_filters_are_zero_mean_wavelets_and_a_unit_mass_low_pass():
    psi = morlet_2d(24, 24, 0.8, math.pi / 4, 3 * math.pi / 4, 0.5)
    assert abs(psi.sum()) < 1e-10 and psi.abs().max() > 1e-2
    assert abs(gaussian_2d(24, 24, 3.2).sum() - 1) < 1e-12


def test_matches_direct_convolution():
    torch.manual_seed(0)
    scat = WaveletScattering2D((8, 8), J=1, L=2)  # 1 + 2 channels, output 4 x 4
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    out = scat(x).float()  # computed in float32, returned in the input's dtype
    assert out.shape == (1, scat.num_channels, 4, 4) == (1, 3, 4, 4)
    p, m = scat.pad, 8 + 2 * scat.pad
    xp = F.pad(x[0], (p, p, p, p), mode="reflect")[0].to(torch.complex128)
    phi = gaussian_2d(m, m, 0.8 * 2)
    crop = (slice(p, p + 8, 2), slice(p, p + 8, 2))
    torch.testing.assert_close(out[0, 0], _circular_conv(xp, phi).real[crop].float(), rtol=1e-4, atol=1e-5)
    for ell in range(2):
        psi = morlet_2d(m, m, 0.8, math.pi * ell / 2, 3 * math.pi / 4, 4.0 / 2)
        u1 = _circular_conv(xp, psi).abs()
        s1 = _circular_conv(u1.to(torch.complex128), phi).real[crop]
        torch.testing.assert_close(out[0, 1 + ell], s1.float(), rtol=1e-4, atol=1e-5)


def test_channels_shape_invariances_and_errors():
    scat = WaveletScattering2D((28, 28))
    assert scat.num_channels == 81
    x = torch.rand(3, 2, 28, 28)
    out = scat(x)
    assert out.shape == (3, 162, 7, 7) and torch.isfinite(out).all()
    torch.testing.assert_close(scat(x[1:2]), out[1:2])  # rows are independent
    const = scat(torch.full((1, 1, 28, 28), 0.7))  # a constant image has no wavelet energy
    assert float(const[0, 1:].abs().max()) < 1e-5 and torch.allclose(const[0, 0], torch.tensor(0.7), atol=1e-5)
    with pytest.raises(ValueError, match=r"`shape` must be divisible by 2\*\*J = 4, got \(30, 28\)"):
        WaveletScattering2D((30, 28))
    with pytest.raises(ValueError, match=r"`input` must be a \(B, C, 28, 28\) tensor, got \(1, 28, 28\)"):
        scat(torch.rand(1, 28, 28))


def test_feature_classifier():
    head = FeatureClassifier((81, 7, 7), 10, norm_groups=27, hidden_channels=(16,))
    assert head(torch.rand(4, 81, 7, 7)).shape == (4, 10)
    assert FeatureClassifier((6, 5), 3)(torch.rand(2, 6, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"`norm_groups` must be a divisor of the 81 feature channels, got 10"):
        FeatureClassifier((81, 7, 7), 10, norm_groups=10)


def test_second_order_matches_direct_computation():
    """S2 = (|(|x * psi_0| * psi_1)| sampled at stride 2) * phi (phi sampled likewise), at stride 4, cropped."""
    torch.manual_seed(1)
    scat = WaveletScattering2D((8, 8), J=2, L=1)  # channels: S0, S1 (j = 0, 1), S2 (0 -> 1)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    out = scat(x).float()
    assert out.shape == (1, 4, 2, 2)
    p, m = scat.pad, 8 + 2 * scat.pad
    xp = F.pad(x[0], (p, p, p, p), mode="reflect")[0].to(torch.complex128)
    psi0 = morlet_2d(m, m, 0.8, 0.0, 3 * math.pi / 4, 4.0)
    psi1 = morlet_2d(m, m, 1.6, 0.0, 3 * math.pi / 8, 4.0)
    u2 = _circular_conv(_circular_conv(xp, psi0).abs().to(torch.complex128), psi1).abs()[::2, ::2]
    phi_coarse = 4 * gaussian_2d(m, m, 0.8 * 4)[::2, ::2]
    s2 = _circular_conv(u2.to(torch.complex128), phi_coarse).real[::2, ::2][1:3, 1:3]
    torch.testing.assert_close(out[0, 3], s2.float(), rtol=1e-4, atol=1e-5)
