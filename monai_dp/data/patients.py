"""Patient-level sampling: a dataset whose items are patients, each item all of that patient's records.

With ``privacy_unit="patient"`` the trainer wraps the training dataset in :class:`PatientDataset` and
Poisson-samples its items, so a patient enters a step with probability q together with all of their records
(or a random subset of at most ``max_records_per_patient``, drawn afresh at every step). :class:`DPCollate`
flattens a patient's records into rows of one ``dp_group``; the per-sample gradient code sums them into one
per-patient gradient, which is clipped as a whole. The accountant counts patients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from monai_dp.utils.validation import error_message

__all__ = ["PatientDataset", "patient_ids_of", "records_per_patient_summary"]


def patient_ids_of(dataset: Any, patient_key: str = "patient_id") -> list[str]:
    """The patient id of every record of a MONAI-style dataset (its ``data`` list of dicts), as strings."""
    records = getattr(dataset, "data", None)
    if records is None:
        raise ValueError(
            error_message("train_data_loader.dataset", "a dataset with a `data` list of records (MONAI Dataset)",
                          type(dataset).__name__,
                          "Pass `patient_ids=[...]` (one id per record) to the trainer instead.")
        )
    ids = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or patient_key not in rec:
            raise ValueError(
                error_message(f"record {i} of the training data", f"a dict with the patient key {patient_key!r}",
                              sorted(rec) if isinstance(rec, dict) else type(rec).__name__,
                              "Add a patient id to every record, set `patient_key`, or use privacy_unit='record'.")
            )
        pid = rec[patient_key]
        if pid is None or (isinstance(pid, str) and not pid.strip()):
            raise ValueError(error_message(f"record {i}[{patient_key!r}]", "a non-empty patient id", pid))
        ids.append(str(pid))
    return ids


def records_per_patient_summary(patient_ids: Sequence[str]) -> dict:
    """Number of patients and the distribution of records per patient (plain types, for reports)."""
    counts = sorted(Counter(patient_ids).values())
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
        patient_ids: one id per record of ``dataset``.
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
        for i, pid in enumerate(patient_ids):
            order.setdefault(str(pid), []).append(i)
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
