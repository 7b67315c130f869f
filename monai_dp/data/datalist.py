"""Datalists for the bundles: a decathlon-style ``dataset.json`` or a MedMNIST ``.npz``, checked before training.

Every problem raises :class:`~monai_dp.utils.errors.DatasetError` naming the file, the record and what is
wrong; nothing is skipped silently (a silently dropped record changes N, and N enters the privacy analysis).
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_dp.utils.errors import DatasetError
from monai_dp.utils.validation import check_choice, error_message

__all__ = ["load_datalist", "SPLITS"]

SPLITS = ("training", "validation", "test")
NPZ_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


def load_datalist(dataset_dir: str | os.PathLike, task: str, num_classes: int, spatial_dims: int,
                  val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
                  check: str = "header") -> dict[str, list[dict]]:
    """``{"training", "validation", "test"}`` lists of records ``{"image", "label"[, "patient_id"]}``.

    Args:
        dataset_dir: a folder with ``dataset.json``, a ``.npz`` file, or a folder holding exactly one ``.npz``.
        task: ``"classification"`` (integer labels) or ``"segmentation"`` (label masks).
        num_classes: labels must lie in ``[0, num_classes)``.
        spatial_dims: 2 or 3.
        val_fraction / test_fraction: share split off ``"training"`` when ``dataset.json`` has no such split
            (by ``patient_id`` when records have one, so no patient is in two splits).
        seed: seed of those splits.
        check: ``"header"`` reads every file's header, ``"full"`` decodes every file, ``"none"`` only checks paths.
    """
    task = check_choice("task", task, ("classification", "segmentation"))
    check = check_choice("check", check, ("header", "full", "none"))
    if spatial_dims not in (2, 3):
        raise ValueError(error_message("spatial_dims", "2 or 3", spatial_dims))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not num_classes >= 2:
        raise ValueError(error_message("num_classes", "an int >= 2", num_classes))
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise ValueError(error_message(name, "in [0, 1)", frac))
    path = Path(dataset_dir)
    if not path.exists():
        raise DatasetError(error_message("dataset_dir", "an existing folder or .npz file", str(path)))
    npz = _find_npz(path)
    if npz is not None:
        if task != "classification":
            raise DatasetError(error_message("dataset_dir", "a dataset.json folder for segmentation", str(npz),
                                             "MedMNIST .npz files hold classification labels only."))
        splits = _load_npz(npz, num_classes, spatial_dims)
    else:
        splits = _load_json(path, task, num_classes, spatial_dims, val_fraction, test_fraction, seed, check)
    for name in ("training", "validation"):
        if not splits[name]:
            raise DatasetError(error_message(f"{name} split of {path}", "non-empty", "0 records",
                                             "Add records or lower the split fractions."))
    if not splits["test"] and (npz is not None or test_fraction > 0):
        raise DatasetError(error_message(f"test split of {path}", "non-empty", "0 records"))
    return splits


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
        raise DatasetError(error_message("dataset_dir", "a folder with dataset.json or one .npz file", str(path)))
    return found[0]


def _load_npz(path: Path, num_classes: int, spatial_dims: int) -> dict[str, list[dict]]:
    try:
        z = np.load(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt file
        raise DatasetError(f"Cannot read {path}: {type(e).__name__}: {e}") from e
    missing = [k for k in NPZ_KEYS if k not in z.files]
    if missing:
        raise DatasetError(error_message(f"{path}", f"a MedMNIST .npz with keys {list(NPZ_KEYS)}",
                                         f"missing {missing}"))
    out = {}
    for split, key in (("training", "train"), ("validation", "val"), ("test", "test")):
        images, labels = z[f"{key}_images"], np.asarray(z[f"{key}_labels"])
        images = _channel_first(images, spatial_dims, f"{path}:{key}_images")
        labels = labels.reshape(len(labels), -1) if len(labels) else labels.reshape(0, 1)
        if labels.shape[1] != 1 or len(labels) != len(images):
            raise DatasetError(error_message(f"{path}:{key}_labels", f"shape ({len(images)},) or ({len(images)}, 1)",
                                             labels.shape))
        bad = np.nonzero((labels[:, 0] < 0) | (labels[:, 0] >= num_classes))[0]
        if len(bad):
            raise DatasetError(error_message(f"{path}:{key}_labels[{bad[0]}]", f"in [0, {num_classes})",
                                             int(labels[bad[0], 0]), "Set num_classes to the number of classes."))
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        out[split] = [{"image": images[i].astype(np.float32) / scale, "label": int(labels[i, 0])}
                      for i in range(len(images))]
    return out


def _channel_first(images: np.ndarray, spatial_dims: int, name: str) -> np.ndarray:
    if images.ndim == spatial_dims + 1:
        return images[:, None]
    if images.ndim == spatial_dims + 2 and spatial_dims == 2:  # (N, H, W, C)
        return np.moveaxis(images, -1, 1)
    raise DatasetError(error_message(name, f"images of a {spatial_dims}D MedMNIST set", f"shape {images.shape}"))


# ---------------------------------------------------------------------------------------------- dataset.json
def _load_json(folder: Path, task: str, num_classes: int, spatial_dims: int, val_fraction: float,
               test_fraction: float, seed: int, check: str) -> dict[str, list[dict]]:
    spec_path = folder / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{spec_path} is not valid JSON: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), list):
        raise DatasetError(error_message(str(spec_path), "a dict with a 'training' list", type(spec).__name__))
    splits = {name: [_record(folder, r, name, i, task) for i, r in enumerate(spec.get(name) or [])]
              for name in SPLITS}
    rng = random.Random(seed)
    if "test" not in spec and test_fraction > 0:
        splits["training"], splits["test"] = _split(splits["training"], test_fraction, rng)
    if "validation" not in spec:
        splits["validation"] = []
        if val_fraction > 0:
            splits["training"], splits["validation"] = _split(splits["training"], val_fraction, rng)
    for name, records in splits.items():
        for i, rec in enumerate(records):
            _check_record(rec, f"{spec_path} {name}[{i}]", task, num_classes, check)
    return splits


def _record(folder: Path, raw: Any, split: str, index: int, task: str) -> dict:
    where = f"{folder / 'dataset.json'} {split}[{index}]"
    if isinstance(raw, str) and split == "test":
        raw = {"image": raw}
    if not isinstance(raw, dict) or "image" not in raw:
        raise DatasetError(error_message(where, "a record with an 'image'", raw))
    rec = dict(raw)
    rec["image"] = _resolve(folder, rec["image"], where)
    if "label" in rec and task == "segmentation":
        rec["label"] = _resolve(folder, rec["label"], where)
    elif "label" in rec and not (isinstance(rec["label"], int) and not isinstance(rec["label"], bool)):
        raise DatasetError(error_message(f"{where} label", "an int class index", rec["label"]))
    elif "label" not in rec and split != "test":
        raise DatasetError(error_message(where, "a record with a 'label'", sorted(rec)))
    if "patient_id" in rec:
        rec["patient_id"] = str(rec["patient_id"])
    return rec


def _resolve(folder: Path, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(error_message(where, "file paths as strings", value))
    path = Path(value) if os.path.isabs(value) else folder / value
    if not path.exists():
        raise DatasetError(f"{where}: file not found: {path}")
    return str(path.resolve())


def _split(records: list[dict], fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Split off ``fraction`` of the records, whole patients at a time when records carry ``patient_id``."""
    keys = [r.get("patient_id", f"__record_{i}") for i, r in enumerate(records)]
    units = sorted(set(keys))
    rng.shuffle(units)
    n_out = max(1, int(round(fraction * len(units)))) if units else 0
    out_units = set(units[:n_out])
    return ([r for r, k in zip(records, keys) if k not in out_units],
            [r for r, k in zip(records, keys) if k in out_units])


# ---------------------------------------------------------------------------------------------- file checks
def _check_record(rec: dict, where: str, task: str, num_classes: int, check: str) -> None:
    if task == "classification" and "label" in rec and not 0 <= rec["label"] < num_classes:
        raise DatasetError(error_message(f"{where} label", f"in [0, {num_classes})", rec["label"],
                                         "Set num_classes to the number of classes."))
    if check == "none":
        return
    shape = image_shape(rec["image"], full=check == "full")
    if task == "segmentation" and "label" in rec:
        label_shape = image_shape(rec["label"], full=check == "full")
        if tuple(shape) != tuple(label_shape):
            raise DatasetError(f"{where}: image {rec['image']} has shape {tuple(shape)} but label {rec['label']} "
                               f"has shape {tuple(label_shape)}; they must match.")


def image_shape(path: str, full: bool = False) -> Sequence[int]:
    """Spatial shape of a NIfTI, PNG or DICOM file (or DICOM series folder), reading the header or, with
    ``full``, the whole file. Raises ``DatasetError`` naming the file when it cannot be read."""
    try:
        if os.path.isdir(path) or path.lower().endswith(".dcm"):
            return _dicom_shape(path, full)
        if path.lower().endswith(".png"):
            return _png_shape(path, full)
        if path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            if full:
                np.asarray(img.dataobj)
            return tuple(int(s) for s in img.shape)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt file
        raise DatasetError(f"Cannot read {path}: {type(e).__name__}: {e}") from e
    raise DatasetError(error_message(f"file {path}", "NIfTI (.nii, .nii.gz), PNG, DICOM (.dcm) or a DICOM folder",
                                     Path(path).suffix or "no extension"))


def _png_shape(path: str, full: bool) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DatasetError(f"Cannot read {path}: not a PNG file (bad signature or header).")
    width, height = struct.unpack(">II", head[16:24])
    if full:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    return (int(width), int(height))  # MONAI's PIL reader puts width first


def _dicom_shape(path: str, full: bool) -> tuple[int, ...]:
    import pydicom

    files = sorted(p for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else [Path(path)]
    if not files:
        raise DatasetError(f"Cannot read {path}: the DICOM series folder is empty.")
    shapes = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=not full)
            if full:
                ds.pixel_array  # noqa: B018 - decode to check the pixel data
            shapes.append((int(ds.Columns), int(ds.Rows)))
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"Cannot read {f} (DICOM): {type(e).__name__}: {e}") from e
    if len(set(shapes)) > 1:
        raise DatasetError(f"Cannot read {path}: slices of the series have different sizes {sorted(set(shapes))}.")
    return shapes[0] + ((len(files),) if os.path.isdir(path) else ())
