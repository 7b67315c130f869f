"""Small models to train with DP on top of fixed features (``monai_dp.bundle.precompute_features``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from monai_dp.utils.validation import error_message

__all__ = ["FeatureClassifier"]


class FeatureClassifier(nn.Module):
    """GroupNorm over feature channels, optional 3x3 convolutions, then a linear classifier.

    The normalisation is per example (GroupNorm), so it costs no privacy, unlike data-set statistics;
    with fixed features it is what makes DP-SGD on a linear model work well (Tramèr & Boneh 2021).

    Args:
        in_shape: feature shape ``(C, *spatial)`` of one example.
        num_classes: number of output logits.
        norm_groups: GroupNorm groups over the ``C`` channels (must divide ``C``); ``None``: one per channel.
        hidden_channels: channels of optional 3x3 convolution + tanh + GroupNorm blocks before the classifier.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm_groups: int | None = None,
                 hidden_channels: Sequence[int] = ()) -> None:
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) < 2:
            raise ValueError(error_message("in_shape", "(C, *spatial) with at least one spatial dimension", in_shape))
        channels = in_shape[0]
        groups = channels if norm_groups is None else int(norm_groups)
        if not (groups >= 1 and channels % groups == 0):
            raise ValueError(error_message("norm_groups", f"a divisor of the {channels} feature channels", norm_groups))
        dims = len(in_shape) - 1
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(dims)
        if hidden_channels and conv is None:
            raise ValueError(error_message("hidden_channels", "empty for features with more than 3 spatial dims",
                                           hidden_channels))
        layers: list[nn.Module] = [nn.GroupNorm(groups, channels)]
        for out in hidden_channels:
            layers += [conv(channels, int(out), 3, padding=1), nn.Tanh(), nn.GroupNorm(math.gcd(int(out), 8), int(out))]
            channels = int(out)
        layers += [nn.Flatten(), nn.Linear(channels * math.prod(in_shape[1:]), int(num_classes))]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
