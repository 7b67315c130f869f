"""Synthetic multi-record patients (``records_per_patient``): counts, seeding, correlated records, whole patients."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from monai_dp.data import load_datalist, make_synthetic_dataset


def _spec(out):
    with open(f"{out}/dataset.json") as f:
        return json.load(f)


def _records(out):
    spec = _spec(out)
    return spec["training"] + spec["test"]


def test_records_per_patient_are_drawn_in_range_and_sum_to_num_items(tmp_path):
    recs = _records(make_synthetic_dataset(tmp_path / "s", "classification", 2, num_items=80, size=16,
                                           records_per_patient=(1, 10)))
    counts = Counter(r["patient_id"] for r in recs)
    assert len(recs) == 80
    assert all(1 <= c <= 10 for c in counts.values())
    assert len(set(counts.values())) >= 5  # drawn, not one fixed count
    # a patient's records are consecutive and share the patient's class
    order = [r["patient_id"] for r in recs]
    assert order == sorted(order)
    assert all(len({r["label"] for r in recs if r["patient_id"] == p}) == 1 for p in counts)


def test_counts_and_images_are_seeded(tmp_path):
    def made(name, seed):
        out = make_synthetic_dataset(tmp_path / name, "segmentation", 2, num_items=30, size=16, seed=seed,
                                     records_per_patient=(2, 6))
        recs = _records(out)
        return [r["patient_id"] for r in recs], [nib.load(f"{out}/{r['image']}").get_fdata() for r in recs]

    ids_a, images_a = made("a", 0)
    ids_b, images_b = made("b", 0)
    ids_c, _ = made("c", 1)
    assert ids_a == ids_b and all(np.array_equal(x, y) for x, y in zip(images_a, images_b))
    assert ids_a != ids_c


def test_records_of_one_patient_share_the_layout(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", "segmentation", 2, num_items=40, size=32, records_per_patient=(2, 8))
    recs = _records(out)
    masks = [nib.load(f"{out}/{r['label']}").get_fdata() > 0 for r in recs]

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    pairs = list(itertools.combinations(range(len(recs)), 2))
    same = [dice(masks[i], masks[j]) for i, j in pairs if recs[i]["patient_id"] == recs[j]["patient_id"]]
    other = [dice(masks[i], masks[j]) for i, j in pairs if recs[i]["patient_id"] != recs[j]["patient_id"]]
    assert np.mean(same) > np.mean(other) + 0.2
    # but not copies: every record has noise of its own where both show background
    first = [i for i, r in enumerate(recs) if r["patient_id"] == recs[0]["patient_id"]][:2]
    images = [nib.load(f"{out}/{recs[i]['image']}").get_fdata() for i in first]
    background = ~masks[first[0]] & ~masks[first[1]]
    assert np.abs(images[0][background] - images[1][background]).mean() > 0.05


def test_no_split_separates_a_patient(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", "classification", 2, num_items=117, size=16,
                                 records_per_patient=(1, 10))
    splits = load_datalist(out, "classification", 2, 2, val_fraction=0.3, seed=3, check="none",
                           patient_key="patient_id")
    owners = {}
    for name, recs in splits.items():
        assert recs, name
        for r in recs:
            assert owners.setdefault(r["patient_id"], name) == name, r["patient_id"]
    assert sum(map(len, splits.values())) == 117


def test_the_default_is_unchanged_and_a_new_value_makes_a_new_set(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", "classification", 2, num_items=12, size=16)
    assert "records_per_patient" not in _spec(out)["synthetic"]
    assert max(Counter(r["patient_id"] for r in _records(out)).values()) == 2
    make_synthetic_dataset(tmp_path / "s", "classification", 2, num_items=12, size=16, records_per_patient=(3, 5),
                           refresh=True)
    assert _spec(out)["synthetic"]["records_per_patient"] == [3, 5]
    made = (tmp_path / "s" / "dataset.json").stat().st_mtime_ns
    make_synthetic_dataset(tmp_path / "s", "classification", 2, num_items=12, size=16, records_per_patient=[3, 5],
                           refresh=True)
    assert (tmp_path / "s" / "dataset.json").stat().st_mtime_ns == made  # same arguments: reused


_ANY = "`records_per_patient` must be None or a pair of ints \\(low, high\\) with 1 <= low <= high"


@pytest.mark.parametrize("kwargs, match", [
    ({"records_per_patient": (0, 10)}, _ANY + r", got \(0, 10\)"),
    ({"records_per_patient": (5, 3)}, _ANY + r", got \(5, 3\)"),
    ({"records_per_patient": (1.0, 3)}, _ANY + r", got \(1.0, 3\)"),
    ({"records_per_patient": 4}, _ANY + r", got 4"),
    ({"records_per_patient": (1, 3), "patients": False}, r"`patients` must be True with records_per_patient, got False"),
    ({"records_per_patient": (10, 10), "num_items": 10},
     r"`num_items` must be enough records for 2 patients of 10-10 records, got 10"),
])
def test_bad_records_per_patient(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_dataset(tmp_path / "x", "classification", 2, **kwargs)
    assert not (tmp_path / "x").exists()
