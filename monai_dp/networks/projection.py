"""A linear classifier on fixed features, projected on directions estimated from a DP release of their statistics.

DP-SGD on a linear head over many fixed features (3,969 scattering coefficients of a 28 x 28 image) is limited by
the noise that accumulates along directions in which the features barely vary. Projecting on the leading
principal directions and scaling them to comparable variance fixes that, but principal directions are statistics
of the private data. Estimating the full covariance privately is hopeless at that dimension (the noise swamps
all but a handful of directions); its *Kronecker factors* are not: the covariance of the channels (C x C, pooled
over positions) and of the positions (S x S, pooled over channels) have few entries and every record contributes
to all of them.

:class:`ProjectedFeatureClassifier` is GroupNorm (no affine: per example, no privacy cost), centring, projection
on the ``components`` products of channel and position eigenvectors with the largest eigenvalue products, scaling
by ``1 / sqrt(eigenvalue product + ridge)``, then a linear layer (the only trainable part).
:meth:`ProjectedFeatureClassifier.release_statistics` computes those statistics from the training set with the
Gaussian mechanism: every record's normalised features ``X`` (C x S) are clipped to Frobenius norm ``R``; the sums
``R·ΣX``, ``ΣXXᵀ`` and ``ΣXᵀX`` (upper triangles) change by at most ``√3·R²`` in L2 norm when one record is added
or removed (``|XXᵀ|_F <= |X|_F²``), and each coordinate gets Gaussian noise of standard deviation ``σ·√3·R²``.
That is one step of the Gaussian mechanism at sample rate 1, accounted as the entry ``(σ, 1, 1)``.

The release is recorded on the module (:attr:`ProjectedFeatureClassifier.release`) with a digest of the
statistics. A DP trainer built on a network holding such a module composes the release before its own steps,
calibrates σ of DP-SGD over both, and charges it to the privacy ledger; it refuses statistics without a matching
record (:func:`statistics_releases`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monai_dp.utils.digest import state_dict_digest
from monai_dp.utils.validation import check_positive, check_positive_int, error_message

__all__ = ["ProjectedFeatureClassifier", "RELEASE_KIND", "statistics_releases"]

logger = logging.getLogger(__name__)

RELEASE_KIND = "feature statistics"
_STATISTICS = ("mean", "channel_basis", "position_basis", "index", "scale")


class ProjectedFeatureClassifier(nn.Module):
    """GroupNorm, centring, projection on privately estimated Kronecker principal directions, linear classifier.

    Args:
        in_shape: feature shape ``(C, *spatial)`` of one example.
        num_classes: number of output logits.
        norm_groups: GroupNorm groups over the ``C`` channels (must divide ``C``); ``None``: one per channel.
        components: number of projected directions kept (at most ``C · S``, ``S`` the number of positions).
        ridge: added to each direction's variance before scaling by ``1 / sqrt(variance + ridge)``; it damps the
            directions whose variance is small or poorly estimated.

    The statistics are buffers (saved with the weights); until :meth:`release_statistics` fills them (or a saved
    state is loaded) the forward pass raises.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm_groups: int | None = None,
                 components: int = 1000, ridge: float = 0.1) -> None:
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) < 2:
            raise ValueError(error_message("in_shape", "(C, *spatial) with at least one spatial dimension", in_shape))
        channels, positions = in_shape[0], math.prod(in_shape[1:])
        groups = channels if norm_groups is None else int(norm_groups)
        if not (groups >= 1 and channels % groups == 0):
            raise ValueError(error_message("norm_groups", f"a divisor of the {channels} feature channels", norm_groups))
        components = check_positive_int("components", components)
        if components > channels * positions:
            raise ValueError(error_message("components", f"at most C x S = {channels * positions}", components))
        self.ridge = check_positive("ridge", ridge)
        self.in_shape, self.channels, self.positions, self.components = in_shape, channels, positions, components
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.register_buffer("mean", torch.zeros(channels, positions))
        self.register_buffer("channel_basis", torch.eye(channels))
        self.register_buffer("position_basis", torch.eye(positions))
        self.register_buffer("index", torch.arange(components))
        self.register_buffer("scale", torch.ones(components))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.linear = nn.Linear(components, int(num_classes))
        self.release: dict | None = None

    # ------------------------------------------------------------------ forward
    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm of ``x`` as ``(N, C, S)`` (what the statistics are taken of)."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(error_message("x", f"features of shape (N, {', '.join(map(str, self.in_shape))})",
                                           tuple(x.shape)))
        return self.norm(x).reshape(len(x), self.channels, self.positions)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The ``components`` scaled projections of ``x`` (N, components)."""
        if not bool(self.fitted):
            raise RuntimeError(error_message(
                "ProjectedFeatureClassifier", "statistics released or loaded before use", "no statistics",
                "Call release_statistics(train_dataset, noise_multiplier=...) before building the trainer, or load "
                "a saved model."))
        z = torch.einsum("ca,ncs,sb->nab", self.channel_basis, self.normalised(x) - self.mean, self.position_basis)
        return z.reshape(len(x), -1)[:, self.index] * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.project(x))

    # ------------------------------------------------------------------ the release
    def statistics_digest(self) -> str:
        """Digest of the statistic buffers (what :attr:`release` vouches for)."""
        return state_dict_digest({name: getattr(self, name) for name in (*_STATISTICS, "fitted")})

    @torch.no_grad()
    def statistic_sums(self, data: Any, clip_norm: float, key: str = "image",
                       batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ΣX, ΣXXᵀ, ΣXᵀX)`` in float64 over the records of ``data``, each record's normalised features ``X``
        (C x S) scaled down to Frobenius norm ``clip_norm`` if above it (the noiseless sums of the release)."""
        c, s = self.channels, self.positions
        total = torch.zeros(c, s, dtype=torch.float64)
        chan = torch.zeros(c, c, dtype=torch.float64)
        pos = torch.zeros(s, s, dtype=torch.float64)
        device = self.mean.device
        for start in range(0, len(data), int(batch_size)):
            items = [data[i] for i in range(start, min(len(data), start + int(batch_size)))]
            x = torch.stack([torch.as_tensor(it[key] if isinstance(it, dict) else it) for it in items])
            x = self.normalised(x.to(device=device, dtype=torch.float32)).double().cpu()
            norms = x.flatten(1).norm(dim=1)
            x = x * (clip_norm / norms.clamp(min=clip_norm))[:, None, None]
            total += x.sum(0)
            chan += torch.einsum("npi,nqi->pq", x, x)
            pos += torch.einsum("npi,npj->ij", x, x)
        return total, chan, pos

    def sensitivity(self, clip_norm: float) -> float:
        """L2 sensitivity of the released sums to one record: ``√3 · R²``."""
        return math.sqrt(3.0) * float(clip_norm) ** 2

    @torch.no_grad()
    def release_statistics(self, data: Any, noise_multiplier: float, clip_norm: float | None = None,
                           key: str = "image", batch_size: int = 1024, noise_seed: int | None = None,
                           secure_mode: bool = False) -> dict:
        """Estimate the statistics from every record of ``data`` with the Gaussian mechanism; returns the record.

        Args:
            data: the training set, map-style (``len`` and indexing): items are feature tensors ``(C, *spatial)``
                or dicts holding one under ``key``. Every record is read once.
            noise_multiplier: σ of the release (noise standard deviation ``σ · √3 · R²``).
            clip_norm: ``R``, the bound on each record's normalised features' Frobenius norm (records above it
                are scaled down to it). ``None``: ``sqrt(C · S)``, the largest norm GroupNorm can give, so that no
                record is changed.
            noise_seed: a fixed seed for the noise (tests only: the noise is then known to whoever knows it);
                recorded in the release and in the trainer's privacy report.
            secure_mode: draw the noise from a cryptographically secure stream.
        """
        from monai_dp.utils.randomness import SecureGaussian, gaussian_noise, private_generator

        if self.release is not None or bool(self.fitted):
            raise RuntimeError(error_message(
                "release_statistics", "called once per network", "statistics already present",
                "A second release spends privacy again; build a new network to re-estimate."))
        sigma = check_positive("noise_multiplier", noise_multiplier)
        bound = math.sqrt(self.channels * self.positions)
        clip = bound if clip_norm is None else check_positive("clip_norm", clip_norm)
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TypeError(error_message("data", "a map-style dataset (len and indexing) of the training records",
                                          type(data).__name__, "Pass the dataset, not a loader that may sample."))
        n = len(data)
        if n < 1:
            raise ValueError(error_message("data", "at least one record", n))
        if secure_mode and noise_seed is not None:
            raise ValueError(error_message("noise_seed", "None with secure_mode=True", noise_seed))
        total, chan, pos = self.statistic_sums(data, clip, key, batch_size)
        c, s = self.channels, self.positions
        std = sigma * self.sensitivity(clip)
        gen = SecureGaussian() if secure_mode else private_generator("cpu", noise_seed)

        def symmetric_noisy(m: torch.Tensor) -> torch.Tensor:
            noise = torch.triu(gaussian_noise(std, m, gen))
            return m + noise + torch.triu(noise, 1).T

        mean = (clip * total + gaussian_noise(std, total, gen)) / (clip * n)
        chan = (symmetric_noisy(chan) - n * mean @ mean.T) / (n * s)
        pos = (symmetric_noisy(pos) - n * mean.T @ mean) / (n * c)
        ev_c, basis_c = torch.linalg.eigh(chan)
        ev_p, basis_p = torch.linalg.eigh(pos)
        products = (ev_c.clamp(min=0)[:, None] * ev_p.clamp(min=0)[None, :]).flatten()
        index = products.argsort(descending=True)[: self.components]
        average = max(float(torch.trace(chan)) / c, 1e-12)  # Σ ≈ (channels ⊗ positions) / average variance
        variance = products[index] / average
        for name, value in (("mean", mean), ("channel_basis", basis_c), ("position_basis", basis_p),
                            ("index", index), ("scale", (variance + self.ridge).rsqrt())):
            buf = getattr(self, name)
            buf.copy_(value.to(dtype=buf.dtype, device=buf.device))
        self.fitted.fill_(True)
        self.release = {"kind": RELEASE_KIND, "noise_multiplier": sigma, "sample_rate": 1.0, "steps": 1,
                        "clip_norm": clip, "num_records": n, "unit": "record", "noise_seed": noise_seed,
                        "secure_mode": bool(secure_mode), "statistics_digest": self.statistics_digest()}
        logger.info("Released the feature statistics of %d records with the Gaussian mechanism (σ = %.4g, R = %.4g); "
                    "a DP trainer on this network composes it before its own steps.", n, sigma, clip)
        return dict(self.release)


def statistics_releases(network: nn.Module) -> list[tuple[str, dict]]:
    """``(module name, release record)`` of every module of ``network`` holding released statistics.

    Raises :class:`~monai_dp.utils.errors.DPConfigurationError` for statistics with no release record (loaded
    into the network before the trainer was built: their privacy is unknown to it) or whose buffers changed since
    their release.
    """
    from monai_dp.utils.errors import DPConfigurationError

    found = []
    for name, module in network.named_modules():
        if not isinstance(module, ProjectedFeatureClassifier) or not bool(module.fitted):
            continue
        where = name or "network"
        release = module.release
        if release is None:
            raise DPConfigurationError(error_message(
                where, "statistics released by release_statistics() on this network",
                "statistics loaded with no release record",
                "Build the trainer on the network first and load the saved model after (its privacy history "
                "composes), or release the statistics anew on this network."))
        if release.get("statistics_digest") != module.statistics_digest():
            raise DPConfigurationError(error_message(
                where, "the statistics of its release", "buffers changed since release_statistics()",
                "Released statistics must not be edited; build a new network and release again."))
        found.append((where, dict(release)))
    return found
