"""The dataset id policy: one function, the training records, identified by (patient_key, image, label)."""

from __future__ import annotations

import pytest

from monai_dp.privacy.fingerprint import (
    DEFAULT_KEYS,
    dataset_fingerprint,
    dataset_fingerprint_of_records,
    identifying_keys,
)


def _records(key="patient_id", n=6):
    return [{key: f"p{i // 2}", "image": f"/data/i{i}.nii.gz", "label": i % 2, "extra": i} for i in range(n)]


def test_default_keys_are_the_identifying_keys_of_patient_id():
    assert identifying_keys() == DEFAULT_KEYS == ("patient_id", "image", "label")
    assert identifying_keys("case") == ("case", "image", "label")


def test_policy_equals_the_fingerprint_with_the_identifying_keys():
    recs = _records("case")
    fp = dataset_fingerprint_of_records(recs, "case")
    assert fp == dataset_fingerprint(recs, keys=("case", "image", "label"))
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 16
    assert dataset_fingerprint_of_records(_records()) == dataset_fingerprint(_records())  # default key: patient_id


def test_the_patient_key_is_part_of_the_id():
    """Records whose patient ids sit under `case`: fingerprinting by `patient_id` misses the ids."""
    recs = _records("case")
    assert dataset_fingerprint_of_records(recs, "case") != dataset_fingerprint_of_records(recs)
    moved = [dict(r, case="someone else") if i == 0 else r for i, r in enumerate(recs)]
    assert dataset_fingerprint_of_records(moved, "case") != dataset_fingerprint_of_records(recs, "case")
    assert dataset_fingerprint_of_records(moved) == dataset_fingerprint_of_records(recs)  # key not looked at


def test_order_and_non_identifying_keys_do_not_matter_records_do():
    recs = _records()
    fp = dataset_fingerprint_of_records(recs)
    assert dataset_fingerprint_of_records(recs[::-1]) == fp
    assert dataset_fingerprint_of_records([dict(r, extra=-1) for r in recs]) == fp
    assert dataset_fingerprint_of_records(recs[:-1]) != fp
    assert dataset_fingerprint_of_records([*recs[:-1], dict(recs[-1], label=0)]) != fp


def test_training_split_only_validation_records_do_not_change_the_id():
    """The policy fingerprints what is trained on: one training list, one id, whatever the other splits hold."""
    datalist = {"training": _records(n=6), "validation": _records(n=8)[6:]}
    fp = dataset_fingerprint_of_records(datalist["training"])
    assert fp != dataset_fingerprint_of_records([r for split in datalist.values() for r in split])
    datalist["validation"] = datalist["validation"][:1]
    assert dataset_fingerprint_of_records(datalist["training"]) == fp


@pytest.mark.parametrize("key,err,match", [
    (None, TypeError, r"`patient_key` must be a str, got 'NoneType'\."),
    ("", ValueError, r"`patient_key` must be a non-empty str, got ''\."),
])
def test_bad_patient_key_is_refused(key, err, match):
    with pytest.raises(err, match=match):
        dataset_fingerprint_of_records(_records(), key)
