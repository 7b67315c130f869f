"""monai_dp.bundle: record loading from files or arrays, stacked metric outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.metrics import Accuracy

from monai_dp.bundle import LoadRecordd, from_engine_stacked


def test_load_record_from_nifti_and_array(tmp_path):
    nib = pytest.importorskip("nibabel")
    img = np.arange(24, dtype=np.float32).reshape(4, 6)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / "a.nii.gz"))
    out = LoadRecordd(keys="image")({"image": str(tmp_path / "a.nii.gz"), "label": 1})
    assert out["image"].shape == (1, 4, 6) and out["label"] == 1
    np.testing.assert_allclose(out["image"][0].numpy(), img)
    arr = np.ones((1, 5, 5), np.float32)
    out = LoadRecordd(keys="image")({"image": arr})
    assert out["image"].shape == (1, 5, 5)


def test_load_record_missing_file_names_it(tmp_path):
    with pytest.raises(Exception, match="missing.nii.gz"):
        LoadRecordd(keys="image")({"image": str(tmp_path / "missing.nii.gz")})


def test_from_engine_stacked_feeds_ignite_accuracy():
    out = [{"pred": torch.tensor([0.9, 0.1, 0.0]), "label_index": torch.tensor(0)},
           {"pred": torch.tensor([0.1, 0.2, 0.7]), "label_index": torch.tensor(1)}]
    y_pred, y = from_engine_stacked(["pred", "label_index"])(out)
    assert y_pred.shape == (2, 3) and y.tolist() == [0, 1]
    acc = Accuracy()
    acc.update((y_pred, y))
    assert acc.compute() == 0.5
