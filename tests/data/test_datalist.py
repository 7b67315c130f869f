"""load_datalist on generated NIfTI, DICOM, PNG and npz data sets, and every way bad data is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_dp.bundle import LoadRecordd
from monai_dp.data import CheckLabelRanged, load_datalist
from monai_dp.utils.errors import DatasetError
from tests.data.formats import write_dicom_series, write_nifti, write_npz, write_png


def _seg_set(tmp_path, n=10, patients=True):
    recs = []
    for i in range(n):
        write_nifti(tmp_path / f"i{i}.nii.gz", np.random.rand(8, 8, 4).astype(np.float32))
        write_nifti(tmp_path / f"l{i}.nii.gz", (np.random.rand(8, 8, 4) > 0.5).astype(np.uint8))
        rec = {"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz"}
        if patients:
            rec["patient_id"] = f"p{i // 3}"
        recs.append(rec)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": recs}))
    return tmp_path


def test_nifti_segmentation_split_by_patient(tmp_path):
    splits = load_datalist(_seg_set(tmp_path, n=12), "segmentation", 2, 3, val_fraction=0.25, test_fraction=0.25)
    ids = {k: {r["patient_id"] for r in v} for k, v in splits.items()}
    assert ids["training"] and ids["validation"] and ids["test"]
    assert not (ids["training"] & ids["validation"] or ids["training"] & ids["test"] or ids["validation"] & ids["test"])
    assert sum(len(v) for v in splits.values()) == 12
    assert all(r["image"].startswith(str(tmp_path)) for r in splits["training"])


def test_classification_png_and_dicom(tmp_path):
    write_png(tmp_path / "a.png", np.arange(48).reshape(6, 8) * 5)
    write_png(tmp_path / "b.png", np.zeros((6, 8)))
    write_dicom_series(tmp_path / "series", np.random.randint(-100, 100, (3, 6, 8)))
    recs = [{"image": "a.png", "label": 0}, {"image": "b.png", "label": 1}, {"image": "series", "label": 1}]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": recs, "validation": recs[:1]}))
    splits = load_datalist(tmp_path, "classification", 2, 2, check="full")
    assert len(splits["training"]) == 3 and len(splits["validation"]) == 1 and splits["test"] == []
    png = LoadRecordd(keys="image")(splits["training"][0])["image"]
    assert png.shape == (1, 8, 6)  # MONAI's PIL reader: width first
    vol = LoadRecordd(keys="image")(splits["training"][2])["image"]
    assert vol.shape[0] == 1 and sorted(vol.shape[1:]) == [3, 6, 8]


def test_npz_2d_and_3d(tmp_path):
    splits = load_datalist(write_npz(tmp_path / "m.npz"), "classification", 3, 2)
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [20, 6, 6]
    rec = splits["training"][0]
    assert rec["image"].shape == (1, 8, 8) and rec["image"].dtype == np.float32 and rec["image"].max() <= 1.0
    assert isinstance(rec["label"], int)
    (tmp_path / "three").mkdir()
    write_npz(tmp_path / "three" / "v.npz", shape=(4, 4, 4))
    assert load_datalist(tmp_path / "three", "classification", 3, 3)["test"][0]["image"].shape == (1, 4, 4, 4)


@pytest.mark.parametrize("damage, match", [
    ("missing", r"training\[1\]: file not found: .*i1.nii.gz"),
    ("corrupt", r"Cannot read .*i2.nii.gz"),
    ("shape", r"image .*i3.nii.gz has shape \(8, 8, 4\) but label .*l3.nii.gz has shape \(8, 8, 5\)"),
])
def test_bad_nifti_is_named(tmp_path, damage, match):
    root = _seg_set(tmp_path, n=5)
    if damage == "missing":
        (root / "i1.nii.gz").unlink()
    elif damage == "corrupt":
        (root / "i2.nii.gz").write_bytes(b"not a nifti at all")
    else:
        write_nifti(root / "l3.nii.gz", np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(DatasetError, match=match):
        load_datalist(root, "segmentation", 2, 3)


def test_corrupt_dicom_and_png(tmp_path):
    write_dicom_series(tmp_path / "s", np.zeros((2, 4, 4)))
    (tmp_path / "s" / "slice001.dcm").write_bytes(b"garbage")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "s", "label": 0}],
                                                       "validation": [{"image": "s", "label": 0}]}))
    with pytest.raises(DatasetError, match=r"Cannot read .*slice001.dcm \(DICOM\)"):
        load_datalist(tmp_path, "classification", 2, 2)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "bad.png", "label": 0}],
                                                       "validation": [{"image": "bad.png", "label": 0}]}))
    with pytest.raises(DatasetError, match=r"Cannot read .*bad.png: not a PNG file"):
        load_datalist(tmp_path, "classification", 2, 2)


def test_label_outside_classes(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4)))
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "a.png", "label": 3}] * 4}))
    with pytest.raises(DatasetError, match=r"label` must be in \[0, 2\), got 3"):
        load_datalist(tmp_path, "classification", 2, 2)
    with pytest.raises(DatasetError, match=r"labels\[\d+\]` must be in \[0, 2\)"):
        load_datalist(write_npz(tmp_path / "m.npz", classes=3), "classification", 2, 2)


def test_mask_values_outside_classes_are_refused_with_the_file(tmp_path):
    write_nifti(tmp_path / "l.nii.gz", np.full((4, 4), 3, np.uint8))
    rec = LoadRecordd(keys="label")({"label": str(tmp_path / "l.nii.gz")})
    with pytest.raises(DatasetError, match=r"Label .*l.nii.gz holds value\(s\) \[3\] outside the classes \[0, 2\)"):
        CheckLabelRanged(keys="label", num_classes=2)(rec)
    ok = {"label": torch.tensor([[0, 1]])}
    assert CheckLabelRanged(keys="label", num_classes=2)(ok) is not ok


@pytest.mark.parametrize("spec, match", [
    ({"training": []}, r"training split of .* must be non-empty"),
    ({"validation": []}, r"must be a dict with a 'training' list"),
    ("not json", r"is not valid JSON"),
])
def test_bad_dataset_json(tmp_path, spec, match):
    (tmp_path / "dataset.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(DatasetError, match=match):
        load_datalist(tmp_path, "classification", 2, 2)


def test_npz_missing_keys_and_empty_split(tmp_path):
    np.savez(tmp_path / "m.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetError, match=r"missing \['val_images', 'val_labels', 'test_images', 'test_labels'\]"):
        load_datalist(tmp_path / "m.npz", "classification", 2, 2)
    write_npz(tmp_path / "e.npz", n=(5, 0, 3))
    with pytest.raises(DatasetError, match=r"validation split of .* must be non-empty, got '0 records'"):
        load_datalist(tmp_path / "e.npz", "classification", 3, 2)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"`task` must be one of \['classification', 'segmentation'\], got 'detection'"):
        load_datalist(tmp_path, "detection", 2, 2)
    with pytest.raises(DatasetError, match=r"`dataset_dir` must be an existing folder or .npz file"):
        load_datalist(tmp_path / "nope", "classification", 2, 2)
