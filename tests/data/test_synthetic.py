"""Synthetic data sets: written once, in the real formats, learnable, patients kept whole, loadable by MONAI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.transforms import LoadImaged

from monai_dp.data import load_datalist, make_synthetic_dataset


def _spec(out):
    with open(f"{out}/dataset.json") as f:
        return json.load(f)


def test_generated_once_and_loadable(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", "segmentation", 3, num_items=6, size=24)
    first = (tmp_path / "s" / "dataset.json").stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "s", "segmentation", 3, num_items=99, size=24) == out
    assert (tmp_path / "s" / "dataset.json").stat().st_mtime_ns == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left behind
    splits = load_datalist(out, "segmentation", 2, 3, val_fraction=0.3, check="full")
    assert splits["test"] and splits["validation"] and splits["training"]
    assert sum(map(len, splits.values())) == 6


def test_segmentation_masks_mark_the_bright_objects(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", "segmentation", 2, num_items=4, size=32)
    rec = _spec(out)["training"][0]
    load = LoadImaged(["image", "label"], reader="NibabelReader", ensure_channel_first=True)
    d = load({k: f"{out}/{rec[k]}" for k in ("image", "label")})
    assert d["image"].shape == d["label"].shape == (1, 32, 32)
    mask = d["label"].numpy().astype(bool)
    assert set(np.unique(mask)) == {False, True}
    assert d["image"].numpy()[mask].mean() > d["image"].numpy()[~mask].mean() + 0.3


def test_classification_is_learnable_and_balanced(tmp_path):
    out = make_synthetic_dataset(tmp_path / "c", "classification", 2, num_items=30, num_classes=3)
    spec = _spec(out)
    recs = spec["training"] + spec["test"]
    assert [sum(r["label"] == c for r in recs) for c in range(3)] == [10, 10, 10]
    load = LoadImaged("image", reader="NibabelReader", ensure_channel_first=True)
    means = np.array([load({"image": f"{out}/{r['image']}"})["image"].mean().item() for r in recs])
    labels = np.array([r["label"] for r in recs])
    assert load({"image": f"{out}/{recs[0]['image']}"})["image"].shape == (1, 64, 64)
    # a threshold on the mean intensity alone separates blob images (class >= 1) from plain noise (class 0)
    assert means[labels > 0].min() > means[labels == 0].max()


def test_patients_are_never_in_training_and_test(tmp_path):
    spec = _spec(make_synthetic_dataset(tmp_path / "p", "classification", 3, num_items=41, size=16))
    ids = {k: [r["patient_id"] for r in spec[k]] for k in ("training", "test")}
    assert len(set(ids["training"])) == 19 and len(set(ids["test"])) == 2
    assert not set(ids["training"]) & set(ids["test"])
    assert max(map(ids["training"].count, ids["training"])) == 2
    no_ids = _spec(make_synthetic_dataset(tmp_path / "r", "classification", 3, num_items=10, size=16, patients=False))
    assert not any("patient_id" in r for r in no_ids["training"] + no_ids["test"]) and len(no_ids["test"]) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    ({"task": "detection"}, ValueError, r"`task` must be one of \['classification', 'segmentation'\]"),
    ({"spatial_dims": 1}, ValueError, r"`spatial_dims` must be 2 or 3, got 1"),
    ({"num_items": 3}, ValueError, r"`num_items` must be an int >= 4, got 3"),
    ({"size": 8}, ValueError, r"`size` must be an int >= 16, got 8"),
    ({"size": 16.0}, TypeError, r"`size` must be an int, got 'float'"),
    ({"num_classes": 1}, ValueError, r"`num_classes` must be an int >= 2, got 1"),
    ({"contrast": 0.0}, ValueError, r"`contrast` must be a number > 0, got 0.0"),
    ({"contrast": float("nan")}, ValueError, r"`contrast` must be a number > 0, got nan"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_synthetic_dataset(tmp_path / "x", **{"task": "classification", "spatial_dims": 2, **kwargs})
    assert not (tmp_path / "x").exists()


def test_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"`out_dir` must be a new or empty folder, or one with a dataset.json"):
        make_synthetic_dataset(tmp_path, "classification", 2, num_items=4)
    (tmp_path / "empty").mkdir()
    assert _spec(make_synthetic_dataset(tmp_path / "empty", "classification", 2, num_items=4, size=16))["training"]


def test_contrast_sets_the_ball_brightness_and_a_new_contrast_makes_a_new_set(tmp_path):
    """The ball is `contrast` noise standard deviations bright: same seed, same noise, only the ball differs."""
    load = LoadImaged("image", reader="NibabelReader", ensure_channel_first=True)
    images = {}
    for contrast in (1.5, 4.0):
        out = make_synthetic_dataset(tmp_path / "s", "classification", 2, num_items=4, size=16, contrast=contrast,
                                     refresh=True)
        rec = next(r for r in _spec(out)["training"] + _spec(out)["test"] if r["label"] == 1)
        images[contrast] = load({"image": f"{out}/{rec['image']}"})["image"].numpy()
        assert _spec(out)["synthetic"].get("contrast") == (None if contrast == 1.5 else 4.0)
    diff = images[4.0] - images[1.5]
    ball = diff > 1e-3
    assert 0 < ball.sum() < ball.size and np.allclose(diff[ball], 2.5, atol=1e-5) and np.allclose(diff[~ball], 0)
