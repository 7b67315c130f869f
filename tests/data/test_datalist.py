"""load_datalist on generated NIfTI, DICOM, PNG and npz data sets, and every way bad data is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged

from monai_dp.data import CheckLabelRanged, load_datalist
from monai_dp.data.datalist import image_shape
from monai_dp.utils import DatasetError
from tests.data.formats import write_dicom_series, write_nifti, write_npz, write_png


def _spec(root, **splits):
    (root / "dataset.json").write_text(json.dumps(splits))
    return root


def _seg_set(root, n=10, per_patient=3, shape=(8, 8, 4)):
    rng, recs = np.random.default_rng(0), []
    for i in range(n):
        write_nifti(root / f"i{i}.nii.gz", rng.random(shape).astype(np.float32))
        write_nifti(root / f"l{i}.nii.gz", (rng.random(shape) > 0.5).astype(np.uint8))
        rec = {"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz"}
        if per_patient:
            rec["patient_id"] = i // per_patient
        recs.append(rec)
    return _spec(root, training=recs)


def _png_set(root, labels=(0, 1, 0, 1), **extra):
    recs = []
    for i, label in enumerate(labels):
        write_png(root / f"p{i}.png", np.full((6, 8), 40 * i))
        recs.append({"image": f"p{i}.png", "label": label})
    return _spec(root, training=recs, **extra)


# ---------------------------------------------------------------------------------------------- sources
def test_split_by_patient_keeps_patients_whole_and_is_seeded(tmp_path):
    root = _seg_set(tmp_path, n=30)
    splits = load_datalist(root, "segmentation", 2, 3, val_fraction=0.2, test_fraction=0.2, seed=1)
    ids = {k: {r["patient_id"] for r in v} for k, v in splits.items()}
    assert [len(ids[k]) for k in ("training", "validation", "test")] == [6, 2, 2]  # of 10 patients
    assert not (ids["training"] & ids["validation"] or ids["training"] & ids["test"] or ids["validation"] & ids["test"])
    assert sum(len(v) for v in splits.values()) == 30 and all(isinstance(p, str) for p in ids["training"])
    assert {r["image"] for v in splits.values() for r in v} == {str(root.resolve() / f"i{i}.nii.gz") for i in range(30)}
    again = load_datalist(root, "segmentation", 2, 3, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert again == splits
    other = load_datalist(root, "segmentation", 2, 3, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert {r["patient_id"] for r in other["test"]} != ids["test"]


def test_patient_key_names_the_patient_id(tmp_path):
    """Ids under another key: split by patient and normalised under that key, as the trainer's `patient_key`."""
    root = _seg_set(tmp_path, n=30)
    spec = json.loads((root / "dataset.json").read_text())
    for r in spec["training"]:
        r["case"] = r.pop("patient_id")
    (root / "dataset.json").write_text(json.dumps(spec))
    splits = load_datalist(root, "segmentation", 2, 3, val_fraction=0.2, test_fraction=0.2, seed=1, patient_key="case")
    ids = {k: {r["case"] for r in v} for k, v in splits.items()}
    assert [len(ids[k]) for k in ("training", "validation", "test")] == [6, 2, 2]  # of 10 patients, kept whole
    assert not (ids["training"] & ids["validation"] or ids["training"] & ids["test"] or ids["validation"] & ids["test"])
    assert all(isinstance(p, str) for p in ids["training"])  # normalised
    by_record = load_datalist(root, "segmentation", 2, 3, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert [len(by_record[k]) for k in ("training", "validation", "test")] == [18, 6, 6]  # the default key is absent
    assert all(isinstance(r["case"], int) for r in by_record["training"])  # not read as a patient id
    with pytest.raises(TypeError, match=r"`patient_key` must be a str, got 'NoneType'\."):
        load_datalist(root, "segmentation", 2, 3, patient_key=None)
    with pytest.raises(ValueError, match=r"`patient_key` must be a non-empty str, got ''\."):
        load_datalist(root, "segmentation", 2, 3, patient_key="")


def test_split_by_record_without_patient_ids(tmp_path):
    splits = load_datalist(_seg_set(tmp_path, n=10, per_patient=0), "segmentation", 2, 3, val_fraction=0.3)
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [7, 3, 0]
    assert "patient_id" not in splits["training"][0]


def test_given_splits_test_as_paths_and_absolute_paths(tmp_path):
    tmp_path = tmp_path.resolve()
    write_png(tmp_path / "a.png", np.zeros((6, 8)))
    absolute = str(write_png(tmp_path / "b.png", np.ones((6, 8))))
    _spec(tmp_path, training=[{"image": "a.png", "label": 0}, {"image": absolute, "label": 1}],
          validation=[{"image": "a.png", "label": 1, "patient_id": 7}], test=["b.png", {"image": "a.png"}])
    splits = load_datalist(tmp_path, "classification", 2, 2, check="full")
    assert [r["image"] for r in splits["test"]] == [absolute, str(tmp_path / "a.png")]
    assert splits["validation"] == [{"image": str(tmp_path / "a.png"), "label": 1, "patient_id": "7"}]
    assert len(splits["training"]) == 2


@pytest.mark.parametrize("kind", ["nifti", "png", "dicom_file", "dicom_series"])
def test_header_shape_is_what_monai_loads(tmp_path, kind):
    """The header checks see the layout the bundles get from LoadImaged (width first for PNG and DICOM)."""
    volume = np.random.default_rng(0).integers(-100, 100, (3, 6, 8))
    if kind == "nifti":
        path, reader = write_nifti(tmp_path / "v.nii.gz", volume.astype(np.float32)), "NibabelReader"
    elif kind == "png":
        path, reader = write_png(tmp_path / "v.png", volume[0] + 100), None  # None: MONAI picks (Pillow)
    else:
        path, reader = write_dicom_series(tmp_path / "s", volume), "PydicomReader"
        path = path / "slice000.dcm" if kind == "dicom_file" else path
    loaded = LoadImaged("image", reader=reader, ensure_channel_first=True)({"image": str(path)})["image"]
    assert tuple(loaded.shape[1:]) == image_shape(str(path)) == image_shape(str(path), full=True)
    expected = {"nifti": volume, "png": (volume[0] + 100).T, "dicom_file": volume[0].T,
                "dicom_series": volume.transpose(2, 1, 0)}[kind]
    np.testing.assert_array_equal(loaded[0].numpy(), expected)
    assert str(loaded.meta["filename_or_obj"]).startswith(str(path))


def test_dicom_series_in_a_3d_set(tmp_path):
    for i in range(4):
        write_dicom_series(tmp_path / f"ct{i}", np.full((3, 6, 8), i))
    _spec(tmp_path, training=[{"image": f"ct{i}", "label": i % 2, "patient_id": f"p{i}"} for i in range(4)])
    splits = load_datalist(tmp_path, "classification", 2, 3, val_fraction=0.25, check="full")
    assert len(splits["training"]) == 3 and len(splits["validation"]) == 1
    with pytest.raises(DatasetError, match=r"training\[0\]: image .*ct0 has spatial shape \(8, 6, 3\), which is not "
                                           r"2D. Set `spatial_dims`"):
        load_datalist(tmp_path, "classification", 2, 2)


def test_npz_2d_rgb_3d_and_folder(tmp_path):
    splits = load_datalist(write_npz(tmp_path / "m.npz"), "classification", 3, 2)
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [20, 6, 6]
    rec = splits["training"][0]
    raw = np.load(tmp_path / "m.npz")
    np.testing.assert_allclose(rec["image"][0], raw["train_images"][0] / 255.0, rtol=1e-6)
    assert rec["image"].shape == (1, 8, 8) and rec["image"].dtype == np.float32
    assert rec["label"] == int(raw["train_labels"][0, 0]) and type(rec["label"]) is int
    rgb = {f"{k}_images": np.ones((2, 5, 5, 3), np.float64) * 7 for k in ("train", "val", "test")}
    np.savez(tmp_path / "rgb.npz", **rgb, **{f"{k}_labels": np.array([0, 1]) for k in ("train", "val", "test")})
    rec = load_datalist(tmp_path / "rgb.npz", "classification", 2, 2)["validation"][1]
    assert rec["image"].shape == (3, 5, 5) and rec["image"].max() == 7 and rec["label"] == 1  # float: not scaled
    (tmp_path / "three").mkdir()
    write_npz(tmp_path / "three" / "v.npz", shape=(4, 4, 4))
    assert load_datalist(tmp_path / "three", "classification", 3, 3)["test"][0]["image"].shape == (1, 4, 4, 4)


# ---------------------------------------------------------------------------------------------- bad files
def _damage(root, how):
    if how == "missing":
        (root / "i1.nii.gz").unlink()
    elif how == "garbage":
        (root / "i2.nii.gz").write_bytes(b"not a nifti at all")
    elif how == "shape":
        write_nifti(root / "l3.nii.gz", np.zeros((8, 8, 5), np.uint8))


@pytest.mark.parametrize("how, match", [
    ("missing", r"dataset.json training\[1\]: image file not found: .*i1.nii.gz"),
    ("garbage", r"dataset.json training\[2\]: Cannot read .*i2.nii.gz: ImageFileError"),
    ("shape", r"training\[3\]: image .*i3.nii.gz has shape \(8, 8, 4\) but label .*l3.nii.gz has shape \(8, 8, 5\)"),
])
def test_bad_nifti_is_named(tmp_path, how, match):
    root = _seg_set(tmp_path, n=5)
    _damage(root, how)
    with pytest.raises(DatasetError, match=match):
        load_datalist(root, "segmentation", 2, 3)


def test_truncated_nifti_data_is_found_by_full_check_only(tmp_path):
    root = _seg_set(tmp_path, n=5, shape=(8, 8, 8))
    write_nifti(root / "l4.nii", np.ones((8, 8, 8), np.uint8))
    (root / "l4.nii").write_bytes((root / "l4.nii").read_bytes()[:400])
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][4]["label"] = "l4.nii"
    _spec(root, **spec)
    assert sum(map(len, load_datalist(root, "segmentation", 2, 3).values())) == 5
    with pytest.raises(DatasetError, match=r"training\[4\]: Cannot read .*l4.nii: "):
        load_datalist(root, "segmentation", 2, 3, check="full")


def test_bad_dicom_is_named(tmp_path):
    write_dicom_series(tmp_path / "s", np.zeros((2, 4, 4)))
    (tmp_path / "empty").mkdir()
    _spec(tmp_path, training=[{"image": "s", "label": 0}], validation=[{"image": "empty", "label": 0}])
    with pytest.raises(DatasetError, match=r"validation\[0\]: Cannot read .*empty: the DICOM series folder holds no"):
        load_datalist(tmp_path, "classification", 2, 3)
    _spec(tmp_path, training=[{"image": "s", "label": 0}], validation=[{"image": "gone", "label": 0}])
    with pytest.raises(DatasetError, match=r"validation\[0\]: image file not found: .*gone"):
        load_datalist(tmp_path, "classification", 2, 3)
    slice1 = tmp_path / "s" / "slice001.dcm"
    slice1.write_bytes(slice1.read_bytes()[:-10])  # pixel data cut short: the header still reads
    _spec(tmp_path, training=[{"image": "s", "label": 0}], validation=[{"image": "s", "label": 1}])
    assert load_datalist(tmp_path, "classification", 2, 3)["training"]
    with pytest.raises(DatasetError, match=r"training\[0\]: Cannot read .*slice001.dcm \(DICOM\): .*pixel data"):
        load_datalist(tmp_path, "classification", 2, 3, check="full")
    slice1.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"training\[0\]: Cannot read .*slice001.dcm \(DICOM\): InvalidDicomError"):
        load_datalist(tmp_path, "classification", 2, 3)


def test_bad_png_is_named(tmp_path):
    root = _png_set(tmp_path)
    (root / "p1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"training\[1\]: Cannot read .*p1.png: not a PNG file"):
        load_datalist(root, "classification", 2, 2)
    data = bytearray(write_png(root / "p1.png", np.zeros((6, 8))).read_bytes())
    data[-20] ^= 0xFF  # inside the image data: only a full check sees it
    (root / "p1.png").write_bytes(bytes(data))
    assert len(load_datalist(root, "classification", 2, 2)["training"]) == 3
    with pytest.raises(DatasetError, match=r"training\[1\]: Cannot read .*p1.png: corrupt PNG chunk b'IDAT'"):
        load_datalist(root, "classification", 2, 2, check="full")


def test_png_mask_of_another_size(tmp_path):
    write_png(tmp_path / "img.png", np.zeros((6, 8)))
    write_png(tmp_path / "ok.png", np.zeros((6, 8)))
    write_png(tmp_path / "seg.png", np.zeros((8, 6)))
    _spec(tmp_path, training=[{"image": "img.png", "label": "ok.png"}, {"image": "img.png", "label": "seg.png"}],
          validation=[{"image": "img.png", "label": "ok.png"}])
    with pytest.raises(DatasetError, match=r"training\[1\]: image .*img.png has shape \(8, 6\) but label .*seg.png "
                                           r"has shape \(6, 8\); they must match"):
        load_datalist(tmp_path, "segmentation", 2, 2)


@pytest.mark.parametrize("label, shown", [(2, "2"), (-1, "-1"), (1.0, "1.0"), ("1", "'1'"), (True, "True")])
def test_class_label_not_an_int_in_range(tmp_path, label, shown):
    root = _png_set(tmp_path, labels=(0, 1, label, 0))
    with pytest.raises(DatasetError, match=rf"training\[2\]: `label` must be an int in \[0, 2\), got {shown}\. Set"):
        load_datalist(root, "classification", 2, 2, check="none")


def test_record_problems(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "a.jpg", np.zeros((4, 4)))
    cases = [([{"image": "a.png"}], r"training\[0\]: the record has no 'label'"),
             (["a.png"], r"training\[0\]: a record must be a dict with an 'image', got 'a.png'"),
             ([{"image": "a.jpg", "label": 0}], r"training\[0\]: Cannot read .*a.jpg: unsupported file type '.jpg'")]
    for training, match in cases:
        _spec(tmp_path, training=training, validation=[{"image": "a.png", "label": 0}])
        with pytest.raises(DatasetError, match=match):
            load_datalist(tmp_path, "classification", 2, 2)


@pytest.mark.parametrize("spec, kwargs, match", [
    ({"training": []}, {}, r"dataset.json: the training split is empty"),
    ({"training": [{"image": "a.png", "label": 0}], "validation": []}, {}, r"the validation split is empty"),
    ({"training": [{"image": "a.png", "label": 0}] * 3, "test": []}, {"test_fraction": 0.2}, r"test split is empty"),
    ({"validation": []}, {}, r"dataset.json: must be a JSON object with a 'training' list .*got keys \['validation'\]"),
    ({"training": {"a": 1}}, {}, r"with a 'training' list of records, got keys \['training'\]"),
    ("[1, 2]", {}, r"dataset.json: must be a JSON object .* got a JSON list"),
    ("{not json", {}, r"dataset.json: not valid JSON"),
])
def test_bad_dataset_json(tmp_path, spec, kwargs, match):
    write_png(tmp_path / "a.png", np.zeros((4, 4)))
    (tmp_path / "dataset.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(DatasetError, match=match):
        load_datalist(tmp_path, "classification", 2, 2, **kwargs)


def test_bad_npz(tmp_path):
    np.savez(tmp_path / "m.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetError, match=r"m.npz: the MedMNIST .npz is missing keys \['val_images', 'val_labels', "
                                           r"'test_images', 'test_labels'\]"):
        load_datalist(tmp_path / "m.npz", "classification", 2, 2)
    with pytest.raises(DatasetError, match=r"e.npz: the validation split is empty"):
        load_datalist(write_npz(tmp_path / "e.npz", n=(5, 0, 3)), "classification", 3, 2)
    with pytest.raises(DatasetError, match=r"c.npz train_labels\[\d+\]: `label` must be an int in \[0, 2\), got 2"):
        load_datalist(write_npz(tmp_path / "c.npz", n=(4, 30, 4), classes=3), "classification", 2, 2)
    with pytest.raises(DatasetError, match=r"v.npz train_images: images of shape \(20, 4, 4, 4\) do not match "
                                           r"spatial_dims=2"):
        load_datalist(write_npz(tmp_path / "v.npz", shape=(4, 4, 4)), "classification", 3, 2)
    with pytest.raises(DatasetError, match=r"f.npz train_images: images of shape \(20, 8, 8\) do not match "
                                           r"spatial_dims=3"):
        load_datalist(write_npz(tmp_path / "f.npz"), "classification", 3, 3)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(DatasetError, match=r"Cannot read .*bad.npz"):
        load_datalist(tmp_path / "bad.npz", "classification", 2, 2)


def test_bad_dataset_dir(tmp_path):
    with pytest.raises(DatasetError, match=r"`dataset_dir` must be an existing folder or .npz file, got '.*nope'"):
        load_datalist(tmp_path / "nope", "classification", 2, 2)
    with pytest.raises(DatasetError, match=r"`dataset_dir` must be a folder with a dataset.json or one .npz file"):
        load_datalist(tmp_path, "classification", 2, 2)
    write_npz(tmp_path / "a.npz")
    write_npz(tmp_path / "b.npz")
    with pytest.raises(DatasetError, match=r"one .npz file, got \['a.npz', 'b.npz'\]. Pass the .npz file itself"):
        load_datalist(tmp_path, "classification", 3, 2)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"task": "detection"}, ValueError, r"`task` must be one of \['classification', 'segmentation'\], got 'detection'"),
    ({"check": "deep"}, ValueError, r"`check` must be one of \['header', 'full', 'none'\], got 'deep'"),
    ({"spatial_dims": 4}, ValueError, r"`spatial_dims` must be 2 or 3, got 4"),
    ({"spatial_dims": 2.0}, TypeError, r"`spatial_dims` must be an int, got 'float'"),
    ({"num_classes": 1}, ValueError, r"`num_classes` must be an int >= 2, got 1"),
    ({"val_fraction": float("nan")}, ValueError, r"`val_fraction` must be in \[0, 1\), got nan"),
    ({"test_fraction": "0.1"}, TypeError, r"`test_fraction` must be a number, got 'str'"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, r"`val_fraction \+ test_fraction` must be < 1, got 1.0"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    args = {"task": "classification", "num_classes": 2, "spatial_dims": 2, **kwargs}
    with pytest.raises(error, match=match):
        load_datalist(tmp_path, **args)


# ---------------------------------------------------------------------------------------------- CheckLabelRanged
def test_mask_values_outside_classes_are_refused_with_the_file(tmp_path):
    write_nifti(tmp_path / "l.nii.gz", np.array([[0, 1], [3, 1]], np.uint8))
    rec = LoadImaged("label", reader="NibabelReader", ensure_channel_first=True)({"label": str(tmp_path / "l.nii.gz")})
    with pytest.raises(DatasetError, match=r"Label .*l.nii.gz holds value\(s\) \[3\] outside the classes \[0, 2\)"):
        CheckLabelRanged(keys="label", num_classes=2)(rec)
    assert CheckLabelRanged(keys="label", num_classes=4)(rec)["label"] is rec["label"]
    with pytest.raises(DatasetError, match=r"Label <in-memory label> holds value\(s\) \[0.5\]"):
        CheckLabelRanged(keys="label", num_classes=2)({"label": torch.tensor([[0.0, 0.5]])})
    with pytest.raises(ValueError, match=r"`num_classes` must be an int >= 1, got 0"):
        CheckLabelRanged(keys="label", num_classes=0)
