"""Synthetic data sets: written once, in the real formats, readable by load_datalist."""

from __future__ import annotations

import json

from monai_dp.data import load_datalist, make_synthetic_dataset


def test_generated_once_and_loadable(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", "segmentation", 3, num_items=6, size=24)
    first = (tmp_path / "s" / "dataset.json").stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "s", "segmentation", 3, num_items=6, size=24) == out
    assert (tmp_path / "s" / "dataset.json").stat().st_mtime_ns == first
    splits = load_datalist(out, "segmentation", 2, 3, val_fraction=0.3)
    assert splits["test"] and splits["validation"] and splits["training"]
    spec = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert all("patient_id" in r for r in spec["training"])


def test_classification_classes_balanced(tmp_path):
    out = make_synthetic_dataset(tmp_path / "c", "classification", 2, num_items=10, size=16, num_classes=3)
    spec = json.loads((tmp_path / "c" / "dataset.json").read_text())
    labels = [r["label"] for r in spec["training"] + spec["test"]]
    assert sorted(set(labels)) == [0, 1, 2]
    assert load_datalist(out, "classification", 3, 2)["training"]
