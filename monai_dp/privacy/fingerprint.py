"""A stable identifier of a data set, from the identifiers of its records (for the privacy ledger).

**The policy**: a data set's default id is :func:`dataset_fingerprint_of_records` of the *training* records
(the records the sampler draws from, which the ledger charges), with the identifying keys ``(patient_key,
"image", "label")``. The trainer, ``monai-dp ledger fingerprint`` and the bundles all call that one function,
so the same training list gets the same id wherever it is computed. Validation and test records are not part
of it: they are not what the budget protects, and a split that changes does not change the charged data set.

:func:`dataset_fingerprint` hashes, for every record, the values of its identifying keys (patient id, image
path or array, label) and sorts the per-record digests, so the id does not depend on record order. It changes
when a record is added, removed or changed. Paths are hashed as given: a datalist whose paths are rewritten
(moved folder, relative vs absolute) gets a new id, so prefer a ``patient_id`` key where there is one.

Pure Python + numpy: tensors are recognised by their ``detach().cpu().numpy()`` methods, torch is not imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monai_dp.utils.validation import error_message

__all__ = ["DEFAULT_KEYS", "DEFAULT_PATIENT_KEY", "dataset_fingerprint", "dataset_fingerprint_of_records",
           "identifying_keys"]

DEFAULT_PATIENT_KEY = "patient_id"
DEFAULT_KEYS = (DEFAULT_PATIENT_KEY, "image", "label")
_VERSION = "monai_dp-fingerprint-v1"


def _array_digest(arr: np.ndarray) -> list:
    if arr.dtype == object:
        return ["o", list(arr.shape), [_canonical(v) for v in arr.ravel().tolist()]]
    data = np.ascontiguousarray(arr)
    return ["a", list(data.shape), data.dtype.str, hashlib.sha256(data.tobytes()).hexdigest()]


def _canonical(value: Any) -> Any:
    """A JSON-able, type-tagged form of ``value`` (an int 1 and a float 1.0 or a string "1" stay distinct)."""
    if value is None:
        return ["none"]
    if isinstance(value, (str, os.PathLike)):
        return ["s", os.fspath(value)]
    if isinstance(value, (bytes, bytearray)):
        return ["y", hashlib.sha256(bytes(value)).hexdigest()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, (int, float)):
        return ["n", repr(value)]
    if isinstance(value, np.ndarray):
        return _array_digest(value)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, duck-typed
        return _array_digest(np.asarray(value.detach().cpu().numpy()))
    if isinstance(value, Mapping):
        return ["d", sorted(([str(k), _canonical(v)] for k, v in value.items()), key=json.dumps)]
    if isinstance(value, (list, tuple)):
        return ["l", [_canonical(v) for v in value]]
    raise TypeError(error_message("record value", "a str, path, number, array, tensor, list or dict",
                                  type(value).__name__))


def dataset_fingerprint(records: Sequence[Mapping], keys: Sequence[str] = DEFAULT_KEYS) -> str:
    """``"sha256:<16 hex>"`` of the identifying ``keys`` of ``records`` (a MONAI datalist), order-independent.

    Every record must hold at least one of ``keys``; keys a record lacks are skipped (and the absence is part of
    the hash). Records that are exact duplicates count as many times as they occur.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(error_message("records", "a list of dict records", type(records).__name__))
    if not records:
        raise ValueError(error_message("records", "a non-empty list of dict records", records))
    if isinstance(keys, str) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(error_message("keys", "a non-empty sequence of str", keys))
    keys = tuple(sorted(set(keys)))
    digests = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise TypeError(error_message(f"records[{i}]", "a dict", type(rec).__name__))
        present = [[k, _canonical(rec[k])] for k in keys if k in rec]
        if not present:
            raise ValueError(error_message(
                f"records[{i}]", f"a dict holding at least one of the keys {list(keys)}", sorted(map(str, rec)),
                "Pass `keys` that name the record's identifiers (patient id, image path)."))
        blob = json.dumps(present, separators=(",", ":"), sort_keys=True)
        digests.append(hashlib.sha256(blob.encode()).hexdigest())
    digests.sort()
    total = hashlib.sha256("\n".join([_VERSION, *keys, *digests]).encode()).hexdigest()
    return f"sha256:{total[:16]}"


def identifying_keys(patient_key: str = DEFAULT_PATIENT_KEY) -> tuple[str, str, str]:
    """The keys that identify a record: ``(patient_key, "image", "label")``."""
    if not isinstance(patient_key, str):
        raise TypeError(error_message("patient_key", "a str", type(patient_key).__name__))
    if not patient_key:
        raise ValueError(error_message("patient_key", "a non-empty str", patient_key))
    return (patient_key, "image", "label")


def dataset_fingerprint_of_records(records: Sequence[Mapping], patient_key: str = DEFAULT_PATIENT_KEY) -> str:
    """The default dataset id: :func:`dataset_fingerprint` of the **training** records by :func:`identifying_keys`.

    Pass the records the trainer samples from (the ``"training"`` list of a datalist), not all splits. Every
    caller (trainer, ``monai-dp ledger fingerprint``, bundles) uses this function, so one training list has one id.
    """
    return dataset_fingerprint(records, keys=identifying_keys(patient_key))
