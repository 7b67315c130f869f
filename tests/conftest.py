"""Shared fixtures: tiny networks and generated data sets (nothing is downloaded)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TinyClassifier(nn.Module):
    """Conv + BatchNorm (converted to GroupNorm by the trainer) + in-place ReLU + linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.features = nn.Sequential(conv(in_channels, 4, 3, padding=1), bn(4), nn.ReLU(inplace=True), pool)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def make_classification_data(n: int = 40, size: int = 8, seed: int = 0, num_classes: int = 2) -> list[dict]:
    """Dict records {"image": (1, size, size) float32, "label": int}; class shifts the mean."""
    rng = np.random.default_rng(seed)
    data = []
    for i in range(n):
        label = i % num_classes
        img = rng.normal(loc=label, scale=1.0, size=(1, size, size)).astype(np.float32)
        data.append({"image": torch.from_numpy(img), "label": torch.tensor(label)})
    return data


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyClassifier()


@pytest.fixture
def cls_data():
    return make_classification_data()


@pytest.fixture(autouse=True)
def _quiet_ignite():
    logging.getLogger("ignite").setLevel(logging.WARNING)
    yield


# --- row independence (ghost clipping) -----------------------------------------------------------------------
from monai_dp.networks import register_row_independent  # noqa: E402

# TinyClassifier.forward (features -> flatten from dim 1 -> head) treats every row on its own: declared, so ghost
# clipping accepts it (the probe on the first batch still checks it)
register_row_independent(TinyClassifier)


class BatchCentring(nn.Module):
    """Subtracts the batch mean (``x - x.mean(0)``): every row's output depends on the other rows."""

    def forward(self, x):
        return x - x.mean(0)


def make_row_mixing_classifier(size: int = 8, num_classes: int = 2) -> nn.Sequential:
    """Flatten -> Linear -> BatchCentring -> ReLU -> Linear, for ``(1, size, size)`` images: ghost clipping refuses
    it (``BatchCentring`` is not known to keep rows independent); per-sample gradients stay within C."""
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 8), BatchCentring(), nn.ReLU(), nn.Linear(8, num_classes))


@pytest.fixture
def row_mixing_net():
    torch.manual_seed(0)
    return make_row_mixing_classifier()
