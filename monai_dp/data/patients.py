"""Patient-level sampling: a dataset whose items are patients, each item all of that patient's records.

With ``privacy_unit="patient"`` the trainer wraps the training dataset in :class:`PatientDataset` and
Poisson-samples its items, so a patient enters a step with probability q together with all of their records
(or a random subset of at most ``max_records_per_patient``, drawn afresh at every step). :class:`DPCollate`
flattens a patient's records into rows of one ``dp_group``; the per-sample gradient code sums them into one
per-patient gradient, which is clipped as a whole. The accountant counts patients.

Patient ids are compared after one normalisation, :func:`normalize_patient_ids`. Two spellings of one patient
(``3`` and ``'3.0'``, ``'p3'`` and ``'p3 '``) would otherwise be two sampling units, and that patient could move
the noisy sum by 2C under a guarantee that assumes C; so spellings that normalise alike are refused.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from monai_dp.utils.errors import DatasetError
from monai_dp.utils.validation import error_message

__all__ = [
    "PatientDataset",
    "PatientIdError",
    "dicom_patient_id",
    "normalize_patient_ids",
    "patient_ids_of",
    "records_per_patient_summary",
]

_INTEGRAL = re.compile(r"[+-]?[0-9]+(\.0*)?")
_MISSING = frozenset({"nan", "none", "null", "<na>"})  # how str(), pandas and JSON spell a missing value
_FIX_IDS = ("Write each patient's id the same way in every record (or make the ids differ if they are different "
            "patients).")


class PatientIdError(DatasetError):
    """A patient id is missing, of an unusable type, or spelled in two ways that normalise alike."""


def _normalize_one(pid: Any, where: str) -> str:
    """The canonical string of one patient id (see :func:`normalize_patient_ids`); ``where`` names the record."""
    if isinstance(pid, str):
        text = pid.strip()
        if not text:
            raise PatientIdError(error_message(where, "a non-empty patient id", pid))
        if text.casefold() in _MISSING:
            raise PatientIdError(error_message(where, "a patient id, not a missing value", pid,
                                               "Give every record a patient id, or use privacy_unit='record'."))
        return str(int(text.split(".")[0])) if _INTEGRAL.fullmatch(text) else text
    if isinstance(pid, numbers.Integral) and not isinstance(pid, bool):
        return str(int(pid))
    if isinstance(pid, numbers.Real) and not isinstance(pid, bool):
        value = float(pid)
        if not math.isfinite(value) or not value.is_integer():
            raise PatientIdError(error_message(where, "a string or a whole number", value,
                                               "Check the datalist's patient column (a missing value reads as nan)."))
        return str(int(value))
    raise PatientIdError(error_message(where, "a patient id (a string or a whole number)",
                                       pid if pid is None or isinstance(pid, bool) else type(pid).__name__,
                                       "Give every record a patient id, or use privacy_unit='record'."))


def _form(pid: Any) -> tuple[str, Any]:
    """The spelling of a raw id: its kind and value (``3`` and ``np.int64(3)`` are one spelling)."""
    if isinstance(pid, str):
        return "str", str(pid)
    if isinstance(pid, numbers.Integral):
        return "int", int(pid)
    return "float", float(pid)


def _shown(pid: Any) -> str:
    return repr(pid.item() if isinstance(pid, np.generic) else pid)


def normalize_patient_ids(ids: Sequence[Any], name: str = "patient_ids", item_name: str | None = None) -> list[str]:
    """One canonical string per patient id; raises :class:`PatientIdError` on missing or ambiguous ids.

    The rule:

    - strings are stripped of surrounding whitespace; a string that is an integer, optionally with a ``.0``
      fraction (``'3'``, ``' 3 '``, ``'003'``, ``'3.0'``), becomes that integer's decimal digits (``'3'``);
      any other string is kept as stripped, case included;
    - whole numbers (``3``, ``np.int64(3)``, ``3.0``, ``np.float32(3)``) become their decimal digits (``'3'``);
    - ``None``, empty strings, NaN, infinities, fractional numbers (``3.5``), bools and other types are refused,
      naming the record; so are the strings ``'nan'``, ``'None'``, ``'null'`` and ``'<NA>'`` (a missing value
      after ``str()``, pandas or JSON);
    - two *different spellings* that normalise to the same id, or to ids that differ only in case, are refused,
      naming both: ``3`` and ``'3.0'``, ``'3'`` and ``'03'``, ``'p3'`` and ``'p3 '``, ``'P3'`` and ``'p3'``.
      Merging them silently could join two different patients, keeping them apart could split one; only the
      datalist knows. The same spelling on many records (``3`` and ``np.int64(3)`` included) is one patient.

    Args:
        ids: one raw id per record.
        name: how errors name the ids (``"patient_ids"``, or the dataset's patient key).
        item_name: how errors name record ``i``, a format string with ``{i}`` (default ``"<name>[{i}]"``).
    """
    item_name = f"{name}[{{i}}]" if item_name is None else item_name
    out: list[str] = []
    seen: dict[str, tuple[tuple[str, Any], Any, int]] = {}
    for i, pid in enumerate(ids):
        norm = _normalize_one(pid, item_name.format(i=i))
        key, form = norm.casefold(), _form(pid)
        first = seen.setdefault(key, (form, pid, i))
        if first[0] != form:
            raise PatientIdError(
                f"`{name}` must spell each patient id one way, got {_shown(first[1])} (record {first[2]}) and "
                f"{_shown(pid)} (record {i}), which both normalise to {key!r} (whitespace stripped, numeric forms "
                f"unified, case ignored). {_FIX_IDS}"
            )
        out.append(norm)
    return out


_HOW_TO_GIVE_IDS = ("Give every record a patient id under `patient_key`, pass `patient_id_pattern` (a regular "
                    "expression over the image path whose group `patient`, or first group, is the id), use DICOM "
                    "images (their PatientID is read), or use privacy_unit='record'.")


def _compile_pattern(pattern: Any) -> re.Pattern | None:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(error_message("patient_id_pattern", "a str (a regular expression) or None", type(pattern).__name__))
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(error_message("patient_id_pattern", "a valid regular expression", pattern, str(err))) from None


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_patient_id(path: str | os.PathLike) -> str | None:
    """The PatientID of a DICOM file, or of the first DICOM file of a series folder; ``None`` if not DICOM.

    Only the header is read. Raises :class:`PatientIdError` when the DICOM data has no PatientID (anonymised).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))]
        path = next((f for f in files if os.path.isfile(f) and _is_dicom(f)), "")
    if not (path and os.path.isfile(path) and _is_dicom(path)):
        return None
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
    value = str(getattr(header, "PatientID", "") or "").strip()
    if not value:
        raise PatientIdError(error_message(f"PatientID of DICOM file {path!r}", "a non-empty patient id", value,
                                           _HOW_TO_GIVE_IDS))
    return value


def _image_path(rec: dict) -> str | None:
    image = rec.get("image")
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def _derived_patient_id(rec: Any, i: int, patient_key: str, pattern: re.Pattern | None) -> str:
    """The patient id of record ``i``, which has no ``patient_key``: from ``pattern`` over its image path, or
    from its DICOM header; refused with how to give ids otherwise."""
    path = _image_path(rec) if isinstance(rec, dict) else None
    if pattern is not None:
        found = None if path is None else pattern.search(path)
        if found is None:
            raise PatientIdError(error_message(
                f"record {i}['image']", f"a path matching patient_id_pattern {pattern.pattern!r}",
                path if path is not None else (type(rec.get("image")).__name__ if isinstance(rec, dict) else rec),
                "Fix the pattern, or give the record its id under `patient_key`."))
        group = "patient" if "patient" in pattern.groupindex else (1 if pattern.groups else 0)
        return found.group(group)
    pid = None if path is None else dicom_patient_id(path)
    if pid is None:
        raise ValueError(error_message(
            f"record {i} of the training data", f"a dict with the patient key {patient_key!r}, or a DICOM image",
            sorted(rec) if isinstance(rec, dict) else type(rec).__name__, _HOW_TO_GIVE_IDS))
    return pid


def patient_ids_of(dataset: Any, patient_key: str = "patient_id", pattern: str | re.Pattern | None = None) -> list[str]:
    """The patient id of every record of a MONAI-style dataset (its ``data`` list of dicts), normalised by
    :func:`normalize_patient_ids`.

    A record's id is its ``patient_key`` entry; a record without one gets the id ``pattern`` finds in its image
    path (the group named ``patient``, else the first group, else the whole match), or without ``pattern`` the
    PatientID of its DICOM image (a ``.dcm`` file or a series folder). Otherwise it is refused, saying how to
    give ids (a record level run then states no patient-level guarantee).
    """
    compiled = _compile_pattern(pattern)
    records = getattr(dataset, "data", None)
    if records is None:
        raise ValueError(
            error_message("train_data_loader.dataset", "a dataset with a `data` list of records (MONAI Dataset)",
                          type(dataset).__name__,
                          "Pass `patient_ids=[...]` (one id per record) to the trainer instead.")
        )
    ids = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and patient_key in rec:
            ids.append(rec[patient_key])
        else:
            ids.append(_derived_patient_id(rec, i, patient_key, compiled))
    return normalize_patient_ids(ids, patient_key, f"record {{i}}[{patient_key!r}]")


def records_per_patient_summary(patient_ids: Sequence[Any]) -> dict:
    """Number of patients and the distribution of records per patient (plain types, for reports).

    ``patient_ids`` (one per record) are normalised by :func:`normalize_patient_ids`."""
    counts = sorted(Counter(normalize_patient_ids(patient_ids)).values())
    if not counts:
        return {"num_patients": 0, "num_records": 0}
    hist = Counter(counts)
    return {
        "num_patients": len(counts),
        "num_records": int(sum(counts)),
        "min": counts[0],
        "median": float(torch.tensor(counts, dtype=torch.float64).median()),
        "mean": sum(counts) / len(counts),
        "max": counts[-1],
        "histogram": {str(k): int(v) for k, v in sorted(hist.items())},
    }


class PatientDataset(Dataset):
    """Items are patients; item ``p`` is the list of rows of all of patient ``p``'s records.

    Args:
        dataset: the record-level dataset (transforms are applied per record, as before).
        patient_ids: one id per record of ``dataset``, normalised by :func:`normalize_patient_ids` (ids spelled
            two ways for one patient are refused).
        max_records_per_patient: take at most this many of a patient's records per step, chosen uniformly at
            random each time the patient is drawn (``None``: all). The patient's gradient is still clipped as a
            whole, so the guarantee does not depend on it; it bounds the memory of patients with many records.
    """

    def __init__(self, dataset: Any, patient_ids: Sequence[Any], max_records_per_patient: int | None = None) -> None:
        n = len(dataset)
        if len(patient_ids) != n:
            raise ValueError(error_message("patient_ids", f"one id per record ({n} records)",
                                           f"{len(patient_ids)} ids"))
        if max_records_per_patient is not None and (isinstance(max_records_per_patient, bool) or not isinstance(
                max_records_per_patient, int) or not max_records_per_patient >= 1):
            raise ValueError(error_message("max_records_per_patient", "an int >= 1 or None", max_records_per_patient))
        self.dataset = dataset
        self.max_records_per_patient = max_records_per_patient
        order: dict[str, list[int]] = {}
        for i, pid in enumerate(normalize_patient_ids(patient_ids)):
            order.setdefault(pid, []).append(i)
        self.patients = list(order)
        self.records = [order[p] for p in self.patients]

    def __len__(self) -> int:
        return len(self.patients)

    def record_indices(self, index: int) -> list[int]:
        """The records of patient ``index`` drawn for this step."""
        rec = self.records[index]
        m = self.max_records_per_patient
        if m is None or len(rec) <= m:
            return list(rec)
        pick = torch.randperm(len(rec))[:m].sort().values.tolist()
        return [rec[i] for i in pick]

    def __getitem__(self, index: int) -> list:
        rows: list = []
        for i in self.record_indices(index):
            item = self.dataset[i]
            if isinstance(item, list):  # a multi-crop transform: all crops belong to the patient
                rows.extend(item)
            else:
                rows.append(item)
        return rows
