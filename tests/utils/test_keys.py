"""DPKeys: the engine.state names are public (configs log them by name), so their spelling is pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_dp.utils.keys import DPKeys

REPO = Path(__file__).resolve().parents[2]
BUNDLE_TRAIN_CONFIGS = sorted((REPO / "bundles").glob("*/configs/train.json"))


def test_names_are_the_published_strings():
    assert (DPKeys.EPSILON, DPKeys.STEPS, DPKeys.EPSILON_STEPS, DPKeys.DELTA, DPKeys.NOISE_MULTIPLIER,
            DPKeys.SAMPLE_RATE, DPKeys.MAX_GRAD_NORM, DPKeys.BUDGET_EXHAUSTED, DPKeys.STOPPED_BY) == (
        "epsilon", "dp_steps", "dp_epsilon_steps", "dp_delta", "dp_noise_multiplier", "dp_sample_rate",
        "dp_max_grad_norm", "dp_budget_exhausted", "dp_stopped_by")
    assert all(type(k) is str for k in DPKeys.COUNTERS)  # plain str: setattr, getattr and JSON configs


def test_counters_are_the_state_attributes_and_nothing_else():
    assert DPKeys.COUNTERS == ("dp_steps", "dp_epsilon_steps", "dp_delta", "dp_noise_multiplier", "dp_sample_rate",
                               "dp_max_grad_norm")
    assert not {DPKeys.BUDGET_EXHAUSTED, DPKeys.STOPPED_BY, DPKeys.EPSILON} & set(DPKeys.COUNTERS)


@pytest.mark.parametrize("path", BUNDLE_TRAIN_CONFIGS, ids=lambda p: p.parents[1].name)
def test_bundles_log_exactly_the_published_counters(path):
    assert BUNDLE_TRAIN_CONFIGS, "no bundle found"
    assert json.loads(path.read_text())["dp_log_attributes"] == list(DPKeys.COUNTERS)
