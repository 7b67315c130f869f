"""Patient ids: one normalisation rule, ambiguous spellings refused, used by every patient-level entry point."""

from __future__ import annotations

import numpy as np
import pytest
from monai.data import Dataset

from monai_dp.data import PatientDataset, normalize_patient_ids, patient_ids_of, records_per_patient_summary
from monai_dp.data.patients import PatientIdError
from monai_dp.utils.errors import DatasetError


def records(ids):
    return Dataset([{"image": np.zeros(2, np.float32), "patient_id": pid} for pid in ids])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ([3, np.int64(3), np.int32(3)], ["3", "3", "3"]),
        ([3.0, np.float32(3.0), np.float64(4)], ["3", "3", "4"]),
        (["3", "3"], ["3", "3"]),
        ([" 3 ", " 3 "], ["3", "3"]),
        (["3.0", "007", "+5", "-2.00", "12345678901234567890"], ["3", "7", "5", "-2", "12345678901234567890"]),
        ([" p3 ", "P4", "3.5", "1.2.840.1", "A-01"], ["p3", "P4", "3.5", "1.2.840.1", "A-01"]),
        ([np.str_("x"), "x"], ["x", "x"]),
    ],
)
def test_normalisation_rule(raw, expected):
    assert normalize_patient_ids(raw) == expected


@pytest.mark.parametrize(
    "raw, shown",
    [
        ([3, "3.0"], r"got 3 \(record 0\) and '3.0' \(record 1\), which both normalise to '3'"),
        ([3, 3.0], r"got 3 \(record 0\) and 3.0 \(record 1\)"),
        ([np.int64(3), "3"], r"got 3 \(record 0\) and '3' \(record 1\)"),
        (["3", "03"], r"got '3' \(record 0\) and '03' \(record 1\)"),
        (["p3", "x", "p3 "], r"got 'p3' \(record 0\) and 'p3 ' \(record 2\), which both normalise to 'p3'"),
        (["P3", "p3"], r"got 'P3' \(record 0\) and 'p3' \(record 1\), which both normalise to 'p3'"),
    ],
)
def test_two_spellings_of_one_id_are_refused_naming_both(raw, shown):
    with pytest.raises(PatientIdError, match=r"`patient_ids` must spell each patient id one way, " + shown
                       + r".*Write each patient's id the same way in every record"):
        normalize_patient_ids(raw)


@pytest.mark.parametrize(
    "bad, shown",
    [
        (None, r"must be a patient id \(a string or a whole number\), got None"),
        ("  ", r"must be a non-empty patient id, got '  '"),
        (float("nan"), r"must be a string or a whole number, got nan. .*missing value reads as nan"),
        (np.float32("inf"), r"must be a string or a whole number, got inf"),
        (3.5, r"must be a string or a whole number, got 3.5"),
        (True, r"must be a patient id \(a string or a whole number\), got True"),
        (b"p1", r"must be a patient id \(a string or a whole number\), got 'bytes'"),
        ("nan", r"must be a patient id, not a missing value, got 'nan'. Give every record a patient id"),
        (" None", r"must be a patient id, not a missing value, got ' None'"),
    ],
)
def test_missing_and_unusable_ids_name_the_record(bad, shown):
    with pytest.raises(PatientIdError, match=r"`patient_ids\[2\]` " + shown):
        normalize_patient_ids(["a", "b", bad])
    with pytest.raises(DatasetError, match=r"`record 2\['patient_id'\]` " + shown):
        patient_ids_of(records(["a", "b", bad]))


def test_patient_ids_of_normalises_and_refuses_ambiguity():
    assert patient_ids_of(records([3, 3, 4.0, " p5 "])) == ["3", "3", "4", "p5"]
    with pytest.raises(PatientIdError, match=r"`patient_id` must spell each patient id one way, got 3 \(record 0\) "
                                             r"and '3.0' \(record 2\)"):
        patient_ids_of(records([3, 4, "3.0"]))


def test_patient_dataset_groups_by_normalised_id():
    units = PatientDataset(records([3, np.int64(3), 4, 4]), [3, np.int64(3), 4.0, np.float32(4)])
    assert units.patients == ["3", "4"] and units.records == [[0, 1], [2, 3]]
    with pytest.raises(PatientIdError, match=r"got 'p3' \(record 0\) and 'p3 ' \(record 1\)"):
        PatientDataset(records(["p3", "p3 "]), ["p3", "p3 "])
    with pytest.raises(PatientIdError, match=r"got 3 \(record 0\) and '3.0' \(record 1\)"):
        PatientDataset(records([3, "3.0"]), [3, "3.0"])


def test_summary_counts_normalised_patients():
    s = records_per_patient_summary([3, np.int64(3), 5])
    assert s["num_patients"] == 2 and s["max"] == 2
    with pytest.raises(PatientIdError, match=r"got 'P3' \(record 0\) and 'p3' \(record 1\)"):
        records_per_patient_summary(["P3", "p3"])
