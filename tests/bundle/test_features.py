"""Features are computed once per record, in batches, per split on first use, without changing the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_dp.bundle import precompute_features


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return torch.stack([x.sum((1, 2, 3)), x.amax((1, 2, 3))], 1)


def _datalist(n_train=5, n_test=3):
    rng = np.random.default_rng(0)
    return {split: [{"image": rng.random((1, 4, 4), dtype=np.float32), "label": i % 2} for i in range(n)]
            for split, n in (("training", n_train), ("test", n_test))}


def test_features_per_record_lazily_and_input_unchanged():
    raw = _datalist()
    before = [r["image"].copy() for r in raw["training"]]
    ext = _Counting()
    feats = precompute_features(raw, ext, batch_size=2, device="cpu")
    assert set(feats) == {"training", "test"} and ext.rows == 0
    test = feats["test"]
    assert ext.rows == 3  # only the split that was read
    assert feats["test"] is test and ext.rows == 3  # computed once
    for r, f in zip(raw["test"], test):
        np.testing.assert_allclose(f["image"], [r["image"].sum(), r["image"].max()], rtol=1e-6)
        assert f["label"] == r["label"] and f["image"].dtype == np.float32
    feats["training"]
    assert ext.rows == 8
    for r, b in zip(raw["training"], before):
        np.testing.assert_array_equal(r["image"], b)


def test_errors_name_the_record():
    raw = _datalist()
    raw["training"][3]["image"] = np.zeros((1, 5, 4), np.float32)
    with pytest.raises(ValueError, match=r"`datalist\['training'\]\[3\]\['image'\] shape` must be \(1, 4, 4\)"):
        precompute_features(raw, _Counting(), batch_size=10)["training"]
    raw["test"][1] = {"label": 0}
    with pytest.raises(ValueError, match=r"`datalist\['test'\]\[1\]` must be a record with a 'image' entry"):
        precompute_features(raw, _Counting())["test"]
    raw["test"][1] = {"image": "a.nii.gz"}
    with pytest.raises(TypeError, match=r"must be an in-memory array, got 'str'.*LoadRecordd"):
        precompute_features(raw, _Counting())["test"]
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0"):
        precompute_features(raw, _Counting(), batch_size=0)
