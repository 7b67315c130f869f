"""cached_features: the second run loads what the first computed, and other inputs or another extractor are
never served stale features."""

from __future__ import annotations

import numpy as np
import torch

from monai_dp.bundle.feature_cache import cached_features


class CountingExtractor(torch.nn.Module):
    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale), persistent=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.flatten(1) * self.scale


def _datalist(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {s: [{"image": rng.normal(size=(1, 3, 3)).astype(np.float32), "label": i % 2} for i in range(5)]
            for s in ("training", "validation")}


def _features(out, split):
    return np.stack([r["image"] for r in out[split]])


def test_second_run_loads_the_first_runs_features_without_calling_the_extractor(tmp_path):
    data = _datalist()
    first_ext = CountingExtractor()
    first = _features(cached_features(data, first_ext, cache_dir=tmp_path, device="cpu"), "training")
    assert first_ext.calls == 1
    again = CountingExtractor()
    out = cached_features(data, again, cache_dir=tmp_path, device="cpu")
    assert np.array_equal(_features(out, "training"), first)
    assert again.calls == 0
    assert out["training"][3]["label"] == data["training"][3]["label"]
    assert np.allclose(first, 2 * np.stack([r["image"].reshape(-1) for r in data["training"]]))


def test_other_inputs_or_another_extractor_are_computed_afresh(tmp_path):
    data = _datalist()
    cached_features(data, CountingExtractor(), cache_dir=tmp_path, device="cpu")["training"]
    changed = _datalist()
    changed["training"][4]["image"][0, 1, 1] += 1.0  # one pixel of one record
    ext = CountingExtractor()
    out = cached_features(changed, ext, cache_dir=tmp_path, device="cpu")
    assert np.allclose(_features(out, "training")[4], 2 * changed["training"][4]["image"].reshape(-1))
    assert ext.calls == 1
    other = CountingExtractor(scale=3.0)  # same class and repr, another (non-persistent) buffer
    out = cached_features(data, other, cache_dir=tmp_path, device="cpu")
    assert np.allclose(_features(out, "training"), 3 * np.stack([r["image"].reshape(-1) for r in data["training"]]))
    assert other.calls == 1
    split = CountingExtractor()  # the validation split is not served the training split's file
    out = cached_features(data, split, cache_dir=tmp_path, device="cpu")
    assert np.allclose(_features(out, "validation"), 2 * np.stack([r["image"].reshape(-1) for r in data["validation"]]))
    assert split.calls == 1


def test_without_cache_dir_nothing_is_written(tmp_path):
    ext = CountingExtractor()
    out = cached_features(_datalist(), ext, cache_dir=None, device="cpu")
    assert len(out["training"]) == 5 and ext.calls == 1
    assert list(tmp_path.iterdir()) == []
