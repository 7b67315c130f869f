"""Datalists for the bundles: a decathlon-style ``dataset.json`` or a MedMNIST ``.npz``, checked before training.

Every problem raises :class:`~monai_dp.utils.errors.DatasetError` naming the file, the record and what is
wrong; nothing is skipped silently (a silently dropped record changes N, and N enters the privacy analysis).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from monai_dp.data.png import check_png, png_header
from monai_dp.utils.errors import DatasetError
from monai_dp.utils.validation import check_choice, error_message

__all__ = ["SPLITS", "image_shape", "load_datalist"]

SPLITS = ("training", "validation", "test")
NPZ_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")
_NUM_CLASSES_FIX = "Set `num_classes` to the number of classes."


def load_datalist(dataset_dir: str | os.PathLike, task: str, num_classes: int, spatial_dims: int,
                  val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
                  check: str = "header", patient_key: str = "patient_id") -> dict[str, list[dict]]:
    """Read and check a data set; return ``{"training", "validation", "test"}`` lists of records.

    A ``dataset.json`` record is ``{"image": path, "label": path or int[, patient_key: str]}`` with absolute
    paths (NIfTI, PNG, DICOM file or DICOM series folder); a ``.npz`` record holds a float32 channel-first
    ``"image"`` array (uint8 sources scaled to [0, 1]) and an int ``"label"``.

    Args:
        dataset_dir: a folder with ``dataset.json``, a MedMNIST ``.npz`` file, or a folder holding one ``.npz``.
        task: ``"classification"`` (int labels) or ``"segmentation"`` (label masks).
        num_classes: labels must lie in ``[0, num_classes)``.
        spatial_dims: 2 or 3; every image must have that many spatial dimensions.
        val_fraction: share of the training units (patients when records carry ``patient_key``, else records)
            moved to ``"validation"`` when ``dataset.json`` has no such list.
        test_fraction: likewise for ``"test"``; with 0 and no ``"test"`` list, ``"test"`` is empty.
        seed: seed of those splits.
        check: ``"header"`` reads every file's header, ``"full"`` decodes every file, ``"none"`` checks only
            that the files exist (and the class labels).
        patient_key: the record key holding the patient id (the trainer's ``patient_key``); its values are
            normalised over all splits, and the splits above never separate one patient's records.

    Raises:
        DatasetError: naming the file (and split and record index) for missing, unreadable or corrupt files,
            bad labels, image/label shape mismatches, wrong dimensionality and empty splits.
    """
    task = check_choice("task", task, ("classification", "segmentation"))
    check = check_choice("check", check, ("header", "full", "none"))
    if not isinstance(patient_key, str):
        raise TypeError(error_message("patient_key", "a str", type(patient_key).__name__))
    if not patient_key:
        raise ValueError(error_message("patient_key", "a non-empty str", patient_key))
    _check_int("spatial_dims", spatial_dims, "2 or 3", lambda v: v in (2, 3))
    _check_int("num_classes", num_classes, "an int >= 2", lambda v: v >= 2)
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, (int, float)):
            raise TypeError(error_message(name, "a number", type(frac).__name__))
        if not 0 <= frac < 1:
            raise ValueError(error_message(name, "in [0, 1)", frac))
    if not val_fraction + test_fraction < 1:
        raise ValueError(error_message("val_fraction + test_fraction", "< 1", val_fraction + test_fraction,
                                       "Leave some records for training."))
    path = Path(dataset_dir)
    if not path.exists():
        raise DatasetError(error_message("dataset_dir", "an existing folder or .npz file", str(path)))
    npz = _find_npz(path)
    if npz is not None:
        if task != "classification":
            raise DatasetError(f"{npz}: MedMNIST .npz files hold classification labels only; use a folder with "
                               "a dataset.json for segmentation.")
        splits, source = _load_npz(npz, num_classes, spatial_dims), npz
    else:
        source = path / "dataset.json"
        splits = _load_json(path, task, num_classes, spatial_dims, val_fraction, test_fraction, seed, check,
                            patient_key)
    for name in SPLITS:
        if not splits[name] and (name != "test" or npz is not None or test_fraction > 0):
            raise DatasetError(f"{source}: the {name} split is empty; add records or lower the split fractions.")
    return splits


def _check_int(name: str, value: Any, constraint: str, ok: Callable[[int], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(error_message(name, "an int", type(value).__name__))
    if not ok(value):
        raise ValueError(error_message(name, constraint, value))


# ---------------------------------------------------------------------------------------------- npz
def _find_npz(path: Path) -> Path | None:
    if path.is_file():
        if path.suffix != ".npz":
            raise DatasetError(error_message("dataset_dir", "a folder or a .npz file", str(path)))
        return path
    if (path / "dataset.json").exists():
        return None
    found = sorted(path.glob("*.npz"))
    if len(found) > 1:
        raise DatasetError(error_message("dataset_dir", "a folder with one .npz file", [f.name for f in found],
                                         "Pass the .npz file itself."))
    if not found:
        raise DatasetError(error_message("dataset_dir", "a folder with a dataset.json or one .npz file", str(path)))
    return found[0]


def _load_npz(path: Path, num_classes: int, spatial_dims: int) -> dict[str, list[dict]]:
    try:
        with open(path, "rb") as f:
            z = np.load(f)
            if not hasattr(z, "files"):
                raise DatasetError(f"{path}: not a .npz archive (it holds a single {type(z).__name__}).")
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DatasetError(f"{path}: the MedMNIST .npz is missing keys {missing}; it must hold "
                                   f"{list(NPZ_KEYS)}.")
            arrays = {k: np.asarray(z[k]) for k in NPZ_KEYS}
    except DatasetError:
        raise
    except Exception as e:  # any reader failure means a corrupt file
        raise DatasetError(f"Cannot read {path}: {type(e).__name__}: {e}") from e
    out = {}
    for split, key in (("training", "train"), ("validation", "val"), ("test", "test")):
        images = _channel_first(arrays[f"{key}_images"], spatial_dims, f"{path} {key}_images")
        labels = _npz_labels(arrays[f"{key}_labels"], len(images), num_classes, f"{path} {key}_labels")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        out[split] = [{"image": images[i].astype(np.float32) / np.float32(scale), "label": labels[i]}
                      for i in range(len(images))]
    return out


def _channel_first(images: np.ndarray, spatial_dims: int, where: str) -> np.ndarray:
    if not np.issubdtype(images.dtype, np.number):
        raise DatasetError(f"{where}: images must be numeric, got dtype {images.dtype}.")
    if images.ndim == spatial_dims + 1:
        return images[:, None]
    if spatial_dims == 2 and images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C)
        return np.moveaxis(images, -1, 1)
    expected = "(N, H, W) or (N, H, W, C) with C 1 or 3" if spatial_dims == 2 else "(N, D, H, W)"
    raise DatasetError(f"{where}: images of shape {images.shape} do not match spatial_dims={spatial_dims}; "
                       f"expected {expected}. Set `spatial_dims` to match the data.")


def _npz_labels(labels: np.ndarray, n: int, num_classes: int, where: str) -> list[int]:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise DatasetError(f"{where}: labels must have shape ({n},) or ({n}, 1), got {labels.shape} "
                           "(multi-label sets are not supported).")
    if not (np.issubdtype(labels.dtype, np.number) and not np.issubdtype(labels.dtype, np.complexfloating)):
        raise DatasetError(f"{where}: labels must be numeric, got dtype {labels.dtype}.")
    bad = np.nonzero(~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0) | (labels >= num_classes))[0]
    if len(bad):
        raise DatasetError(f"{where}[{bad[0]}]: " + error_message("label", f"an int in [0, {num_classes})",
                                                                   labels[bad[0]].item(), _NUM_CLASSES_FIX))
    return [int(v) for v in labels]


# ---------------------------------------------------------------------------------------------- dataset.json
def _load_json(folder: Path, task: str, num_classes: int, spatial_dims: int, val_fraction: float,
               test_fraction: float, seed: int, check: str, patient_key: str) -> dict[str, list[dict]]:
    spec_path = folder / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as e:
        raise DatasetError(f"{spec_path}: not valid JSON ({e}).") from e
    except OSError as e:
        raise DatasetError(f"Cannot read {spec_path}: {type(e).__name__}: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), list):
        got = f"keys {sorted(spec)}" if isinstance(spec, dict) else f"a JSON {type(spec).__name__}"
        raise DatasetError(f"{spec_path}: must be a JSON object with a 'training' list of records, got {got}.")
    splits = {}
    for name in SPLITS:
        if not isinstance(spec.get(name, []), list):
            raise DatasetError(f"{spec_path}: '{name}' must be a list of records, got {type(spec[name]).__name__}.")
        splits[name] = []
        for i, raw in enumerate(spec.get(name, [])):  # checked before splitting: indices are those of the file
            where = f"{spec_path} {name}[{i}]"
            rec = _record(folder, raw, where, name == "test", task, num_classes)
            _check_record(rec, where, task, spatial_dims, check)
            splits[name].append(rec)
    _normalize_ids(splits, spec_path, patient_key)
    fractions = {}
    if "test" not in spec and test_fraction > 0:
        fractions["test"] = test_fraction
    if "validation" not in spec and val_fraction > 0:
        fractions["validation"] = val_fraction
    if fractions:
        splits.update(_split(splits["training"], fractions, random.Random(seed), patient_key))
    return splits


def _normalize_ids(splits: dict[str, list[dict]], spec_path: Any, patient_key: str) -> None:
    """Patient ids by :func:`~monai_dp.data.patients.normalize_patient_ids`, over all splits at once: one
    patient spelled two ways (``3`` and ``'3.0'``) is refused, never split between training and validation."""
    from monai_dp.data.patients import normalize_patient_ids

    where = [(name, i) for name in SPLITS for i, r in enumerate(splits[name]) if patient_key in r]
    if not where:
        return
    ids = normalize_patient_ids([splits[n][i][patient_key] for n, i in where], name=patient_key,
                                item_name=f"{spec_path} record {{i}} (counting training, validation, test)")
    for (name, i), pid in zip(where, ids):
        splits[name][i][patient_key] = pid


def _record(folder: Path, raw: Any, where: str, is_test: bool, task: str, num_classes: int) -> dict:
    if isinstance(raw, str) and is_test:
        raw = {"image": raw}
    if not isinstance(raw, dict) or "image" not in raw:
        raise DatasetError(f"{where}: a record must be a dict with an 'image', got {raw!r}.")
    rec = dict(raw)
    rec["image"] = _resolve(folder, rec["image"], where, "image")
    if "label" not in rec:
        if not is_test:
            raise DatasetError(f"{where}: the record has no 'label' (keys {sorted(rec)}).")
    elif task == "segmentation":
        rec["label"] = _resolve(folder, rec["label"], where, "label")
    elif isinstance(rec["label"], bool) or not isinstance(rec["label"], int) or not 0 <= rec["label"] < num_classes:
        raise DatasetError(f"{where}: " + error_message("label", f"an int in [0, {num_classes})", rec["label"],
                                                        _NUM_CLASSES_FIX))
    return rec


def _resolve(folder: Path, value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: " + error_message(key, "a file path", value))
    path = Path(value) if os.path.isabs(value) else folder / value
    if not path.exists():
        raise DatasetError(f"{where}: {key} file not found: {path}")
    return str(path.resolve())


def _split(records: list[dict], fractions: dict[str, float], rng: random.Random,
           patient_key: str) -> dict[str, list[dict]]:
    """Move ``fractions[name]`` of the units (patients, or records without ``patient_key``) to split ``name``."""
    keys = [("patient", r[patient_key]) if patient_key in r else ("record", str(i)) for i, r in enumerate(records)]
    units = sorted(set(keys))
    rng.shuffle(units)
    assign, start = {}, 0
    for name, frac in fractions.items():
        n = max(1, round(frac * len(units)))
        assign.update((u, name) for u in units[start : start + n])
        start += n
    out: dict[str, list[dict]] = {name: [] for name in ("training", *fractions)}
    for rec, key in zip(records, keys):
        out[assign.get(key, "training")].append(rec)
    return out


# ---------------------------------------------------------------------------------------------- file checks
def _check_record(rec: dict, where: str, task: str, spatial_dims: int, check: str) -> None:
    if check == "none":
        return
    keys = ("image", "label") if task == "segmentation" and "label" in rec else ("image",)
    shapes = {}
    for key in keys:
        try:
            shapes[key] = image_shape(rec[key], full=check == "full")
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from e
        extra = shapes[key][spatial_dims:]
        if len(shapes[key]) < spatial_dims or any(s != 1 for s in extra):
            raise DatasetError(f"{where}: {key} {rec[key]} has spatial shape {shapes[key]}, which is not "
                               f"{spatial_dims}D. Set `spatial_dims` to match the data.")
    if len(shapes) == 2 and shapes["image"][:spatial_dims] != shapes["label"][:spatial_dims]:
        raise DatasetError(f"{where}: image {rec['image']} has shape {shapes['image']} but label {rec['label']} "
                           f"has shape {shapes['label']}; they must match.")


def image_shape(path: str, full: bool = False) -> tuple[int, ...]:
    """Spatial shape of an image file as MONAI's ``LoadImage`` lays it out, from its header.

    NIfTI: the first three header dimensions (later ones are channels to MONAI); PNG: ``(width, height)``;
    DICOM: ``(columns, rows)``, plus the number of slices for a series folder of several files.

    Args:
        path: a NIfTI, PNG or DICOM file, or a DICOM series folder (hidden files are ignored, as MONAI does).
        full: also decode the pixel data.

    Raises:
        DatasetError: naming the file when it cannot be read or its type is not supported.
    """
    low = path.lower()
    try:
        if os.path.isdir(path) or low.endswith(".dcm"):
            return _dicom_shape(path, full)
        if low.endswith(".png"):
            if full:
                return check_png(path)
            header = png_header(path)
            return header["width"], header["height"]
        if low.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            if full:
                np.asarray(img.dataobj)
            return tuple(int(s) for s in img.shape[:3])
    except DatasetError:
        raise
    except Exception as e:  # any reader failure means a corrupt file
        raise DatasetError(f"Cannot read {path}: {type(e).__name__}: {e}") from e
    raise DatasetError(f"Cannot read {path}: unsupported file type {Path(path).suffix or 'without extension'!r}; "
                       "use NIfTI (.nii, .nii.gz), PNG (.png), DICOM (.dcm) or a DICOM series folder.")


def _dicom_shape(path: str, full: bool) -> tuple[int, ...]:
    import pydicom

    is_series = os.path.isdir(path)
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")) if is_series \
        else [Path(path)]
    if not files:
        raise DatasetError(f"Cannot read {path}: the DICOM series folder holds no files.")
    sizes = set()
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=not full)
            if full:
                ds.pixel_array  # noqa: B018 - decode to check the pixel data
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            sizes.add((int(ds.Columns), int(ds.Rows)) + ((frames,) if frames > 1 else ()))
        except Exception as e:  # any reader failure means a corrupt file
            raise DatasetError(f"Cannot read {f} (DICOM): {type(e).__name__}: {e}") from e
    if len(sizes) > 1:
        raise DatasetError(f"Cannot read {path}: the slices of the series have different sizes {sorted(sizes)}.")
    return sizes.pop() + ((len(files),) if len(files) > 1 else ())
