"""Which units are sampled and protected: records, or patients with all their records.

:func:`sampling_units` resolves ``privacy_unit`` for a training loader: the dataset of units to Poisson-sample
(``None`` at record level: the loader's own records) and the records-per-patient summary the report states.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from monai_dp.data.patients import (
    PatientDataset,
    PatientIdError,
    normalize_patient_ids,
    patient_ids_of,
    records_per_patient_summary,
)
from monai_dp.utils.validation import error_message

__all__ = ["PRIVACY_UNITS", "resolve_patient_ids", "sampling_units"]

logger = logging.getLogger("monai_dp.engines.trainer")

PRIVACY_UNITS = ("record", "patient")


def resolve_patient_ids(loader: Any, patient_key: str, patient_ids: Sequence | None,
                        patient_id_pattern: str | None) -> Sequence | None:
    """``patient_ids`` as given, or with ``patient_id_pattern`` the ids of the loader's records (their
    ``patient_key`` entry, else the pattern over their image path; see :func:`patient_ids_of`)."""
    if patient_id_pattern is None or patient_ids is not None:
        return patient_ids
    dataset = loader.dataset if isinstance(loader, DataLoader) else None
    return patient_ids_of(dataset, patient_key, pattern=patient_id_pattern)


def sampling_units(loader: Any, unit: str, patient_key: str, patient_ids: Sequence | None,
                    max_records_per_patient: int | None) -> tuple[PatientDataset | None, dict | None]:
    """The patient-level dataset to sample (``None`` at record level) and the records-per-patient summary.

    At record level the summary is still computed when the records carry patient ids, so the report can
    state the (weaker) patient-level guarantee that the record-level run implies.
    """
    dataset = loader.dataset if isinstance(loader, DataLoader) else None
    if unit == "record":
        if max_records_per_patient is not None:
            raise ValueError(error_message("max_records_per_patient", "None with privacy_unit='record'",
                                           max_records_per_patient, "Use privacy_unit='patient'."))
        try:
            ids = normalize_patient_ids(patient_ids) if patient_ids is not None else None
            if ids is None and dataset is not None:
                try:
                    ids = patient_ids_of(dataset, patient_key)
                except PatientIdError:
                    raise
                except ValueError:  # no patient ids: nothing to say about patients
                    ids = None
        except PatientIdError as err:
            logger.warning("The records' patient ids are ambiguous (%s); the report states no patient-level "
                           "guarantee. Fix the ids to get it.", err)
            ids = None
        return None, (records_per_patient_summary(ids) if ids else None)
    ids = normalize_patient_ids(patient_ids) if patient_ids is not None else patient_ids_of(dataset, patient_key)
    units = PatientDataset(dataset, ids, max_records_per_patient)
    summary = records_per_patient_summary(ids)
    logger.info("Patient-level DP: %d records of %d patients (records per patient: median %.3g, max %d)%s.",
                summary["num_records"], summary["num_patients"], summary["median"], summary["max"],
                "" if max_records_per_patient is None else f"; at most {max_records_per_patient} per patient per step")
    return units, summary
