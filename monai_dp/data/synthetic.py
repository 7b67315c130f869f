"""Synthetic data sets the bundles train on when no ``--dataset_dir`` is given, written as real files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from monai_dp.utils.validation import (
    check_choice,
    check_positive_int,
    error_message,
    is_integer,
)

__all__ = ["make_synthetic_dataset"]


def make_synthetic_dataset(out_dir: str | os.PathLike, task: str, spatial_dims: int, num_items: int = 40,
                           size: int | None = None, num_classes: int = 2, seed: int = 0,
                           patients: bool = True, refresh: bool = False, contrast: float = 1.5,
                           records_per_patient: tuple[int, int] | None = None) -> str:
    """Write NIfTI images (and masks) and a decathlon-style ``dataset.json`` into ``out_dir``; return ``out_dir``.

    Classification: class ``c > 0`` images hold a ball ``contrast`` standard deviations brighter than the noise, whose
    radius grows with ``c``; class 0 only noise. Classes are balanced (record ``i`` has class ``i % num_classes``).
    Segmentation: ``monai.data.create_test_image_2d/3d`` images with binary masks. Two records per patient
    (``patient_id``) when ``patients``, or 1 to 10 (say) with ``records_per_patient``. About 10 % of the patients
    (at least one) form the ``"test"`` list, so no patient is both in ``"training"`` and ``"test"``.

    Generated once: if ``out_dir/dataset.json`` exists nothing is written, unless ``refresh`` is set and the set
    there was made with other arguments (its ``dataset.json`` records them under ``"synthetic"``): then it is
    replaced. The files are written to a temporary folder that is renamed into place, so concurrent processes
    (``torchrun``) never read a half-written set.

    Args:
        out_dir: a new or empty folder (or one holding a ``dataset.json``: then nothing is done).
        task: ``"classification"`` or ``"segmentation"``.
        spatial_dims: 2 or 3.
        num_items: number of records, at least 4.
        size: image side in voxels, at least 16; defaults to 64 (2D) or 32 (3D).
        num_classes: classes of the classification labels (segmentation masks are binary), at least 2.
        seed: seed of the generated images.
        patients: give every two consecutive records the same ``patient_id``.
        refresh: replace a set made with other arguments (a bundle's ``--synthetic_items`` changed) instead of
            reusing it. A ``dataset.json`` that this function did not write is never replaced.
        contrast: classification only: how much brighter the ball is than the unit-variance background noise
            (> 0; the bundles pass a larger value than the default so that their DP default run learns).
        records_per_patient: ``(low, high)``: patients with several, correlated records, for patient-level DP.
            Each patient's number of records is drawn uniformly from ``low..high`` (seeded by ``seed``; the last
            patient is cut so that there are ``num_items`` records in all, so it may have fewer than ``low``).
            A patient's records share one layout (segmentation: the same objects; classification: the same
            class, ``p % num_classes`` for patient ``p``, so balanced over patients rather than records, and the
            same ball) and differ by a shift of up to 2 voxels per axis and by fresh noise. ``None``
            (default): two independent records per patient as described above. Needs ``patients``.
    """
    task = check_choice("task", task, ("classification", "segmentation"))
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(error_message("spatial_dims", "2 or 3", spatial_dims))
    if not check_positive_int("num_items", num_items) >= 4:
        raise ValueError(error_message("num_items", "an int >= 4", num_items, "Training and test need records."))
    size = (64 if spatial_dims == 2 else 32) if size is None else check_positive_int("size", size)
    if not size >= 16:
        raise ValueError(error_message("size", "an int >= 16", size))
    if not check_positive_int("num_classes", num_classes) >= 2:
        raise ValueError(error_message("num_classes", "an int >= 2", num_classes))
    if isinstance(contrast, bool) or not isinstance(contrast, (int, float)) or not contrast > 0:
        raise ValueError(error_message("contrast", "a number > 0", contrast))
    spans = _check_records_per_patient(records_per_patient, patients, num_items, seed)
    out_dir = os.fspath(out_dir)
    arguments = {"task": task, "spatial_dims": spatial_dims, "num_items": num_items, "size": size,
                 "num_classes": num_classes, "seed": seed, "patients": bool(patients)}
    if contrast != 1.5:  # recorded only when not the default, so sets made before this argument are still reused
        arguments["contrast"] = float(contrast)
    if spans is not None:  # likewise
        arguments["records_per_patient"] = spans
    if os.path.exists(os.path.join(out_dir, "dataset.json")):
        if not refresh or _made_with(out_dir) == arguments:
            return out_dir
        return _replace(out_dir, arguments)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(error_message("out_dir", "a new or empty folder, or one with a dataset.json", out_dir,
                                       "Choose another folder for the synthetic data set."))
    tmp = _generate(out_dir, arguments)
    try:
        _move_into_place(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out_dir


def _generate(out_dir: str, arguments: dict) -> str:
    """Write the set into a new temporary folder beside ``out_dir``; return that folder."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".synthetic-")
    try:
        a = arguments
        if "records_per_patient" in a:
            records = _write_patients(tmp, a["task"], a["spatial_dims"], a["size"], a["num_classes"], a["seed"],
                                      _counts(a["num_items"], a["records_per_patient"], a["seed"]),
                                      a.get("contrast", 1.5))
        else:
            records = _write(tmp, a["task"], a["spatial_dims"], a["num_items"], a["size"], a["num_classes"],
                             a["seed"], a["patients"], a.get("contrast", 1.5))
        training, test = _hold_out_test(records)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump({"name": f"synthetic {a['spatial_dims']}D {a['task']}", "synthetic": arguments,
                       "training": training, "test": test}, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    return tmp


def _made_with(out_dir: str) -> dict | None:
    """The arguments recorded in ``out_dir/dataset.json`` (``None`` for a data set this module did not write)."""
    with open(os.path.join(out_dir, "dataset.json")) as f:
        made = json.load(f).get("synthetic")
    return made if isinstance(made, dict) else None


def _replace(out_dir: str, arguments: dict) -> str:
    """Swap a synthetic set made with other arguments for a new one."""
    if _made_with(out_dir) is None:
        raise ValueError(error_message("out_dir", "a folder of a synthetic data set (its dataset.json records the "
                                       "arguments under 'synthetic')", out_dir,
                                       "Choose another folder for the synthetic data set."))
    tmp = _generate(out_dir, arguments)
    aside = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".synthetic-old-")
    try:
        os.rename(out_dir, os.path.join(aside, "old"))
        os.rename(tmp, out_dir)
    except OSError:  # another process replaced it first
        if _made_with(out_dir) != arguments:
            raise
    finally:
        for folder in (tmp, aside):
            if os.path.exists(folder):
                shutil.rmtree(folder)
    return out_dir


def _hold_out_test(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """The last ~10 % of the patients (or records) form the test list; a patient is never split."""
    units = list(dict.fromkeys(r.get("patient_id", r["image"]) for r in records))
    test_units = set(units[-max(1, len(units) // 10):])
    return ([r for r in records if r.get("patient_id", r["image"]) not in test_units],
            [r for r in records if r.get("patient_id", r["image"]) in test_units])


def _move_into_place(tmp: str, out_dir: str) -> None:
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        try:
            os.rmdir(out_dir)
        except OSError:  # another process is filling it
            pass
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process finished first
        if not os.path.exists(os.path.join(out_dir, "dataset.json")):
            raise


def _write(folder: str, task: str, dims: int, n: int, size: int, num_classes: int, seed: int,
           patients: bool, contrast: float = 1.5) -> list[dict]:
    import nibabel as nib
    from monai.data import create_test_image_2d, create_test_image_3d

    rs = np.random.RandomState(seed)
    grid = np.indices((size,) * dims)
    records = []
    for i in range(n):
        rec: dict = {"image": f"img{i:04d}.nii.gz"}
        if task == "segmentation":
            make = create_test_image_2d if dims == 2 else create_test_image_3d
            img, seg = make(*((size,) * dims), num_objs=3, rad_max=max(size // 6, 6), rad_min=4,
                            num_seg_classes=1, noise_max=0.3, random_state=rs)
            nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), os.path.join(folder, f"seg{i:04d}.nii.gz"))
            rec["label"] = f"seg{i:04d}.nii.gz"
        else:
            label = i % num_classes
            img = rs.normal(0.0, 1.0, (size,) * dims)
            if label:
                centre = rs.randint(size // 3, 2 * size // 3, size=dims)
                img += _ball(grid, centre, label, size, contrast)
            rec["label"] = int(label)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), os.path.join(folder, rec["image"]))
        if patients:
            rec["patient_id"] = f"patient{i // 2:04d}"
        records.append(rec)
    return records


def _check_records_per_patient(value, patients: bool, num_items: int, seed: int) -> list[int] | None:
    """``records_per_patient`` as a ``[low, high]`` list (how ``dataset.json`` records it), or ``None``."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_integer, value))
            and 1 <= value[0] <= value[1]):
        raise ValueError(error_message("records_per_patient", "None or a pair of ints (low, high) with "
                                       "1 <= low <= high", value, "E.g. (1, 10)."))
    if not patients:
        raise ValueError(error_message("patients", "True with records_per_patient", patients))
    spans = [int(value[0]), int(value[1])]
    if not len(_counts(num_items, spans, seed)) >= 2:
        raise ValueError(error_message("num_items", f"enough records for 2 patients of {spans[0]}-{spans[1]} "
                                       "records", num_items, "Raise num_items or lower records_per_patient."))
    return spans


def _counts(num_items: int, spans: list[int], seed: int) -> list[int]:
    """Records per patient, uniform on ``spans[0]..spans[1]``, the last one cut so they sum to ``num_items``."""
    rs = np.random.RandomState([seed, 1])  # a stream of its own: the images' stream is that of ``_write``
    counts: list[int] = []
    while sum(counts) < num_items:
        counts.append(min(int(rs.randint(spans[0], spans[1] + 1)), num_items - sum(counts)))
    return counts


def _shift(a: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``a`` moved by integer ``offsets`` along its axes, zero-filled (nothing wraps around)."""
    out = np.zeros_like(a)
    src = tuple(slice(max(0, -o), a.shape[i] - max(0, o)) for i, o in enumerate(offsets))
    dst = tuple(slice(max(0, o), a.shape[i] - max(0, -o)) for i, o in enumerate(offsets))
    out[dst] = a[src]
    return out


def _ball(grid: np.ndarray, centre, label: int, size: int, contrast: float) -> np.ndarray:
    """Class ``label``'s ball (radius growing with the class) at ``centre``, ``contrast`` bright."""
    radius = size / 8 * (1 + 0.5 * (label - 1))
    return contrast * (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2)


def _write_patients(folder: str, task: str, dims: int, size: int, num_classes: int, seed: int, counts: list[int],
                    contrast: float) -> list[dict]:
    """Patient ``p`` gets ``counts[p]`` records: one layout, each record shifted by up to 2 voxels, fresh noise."""
    import nibabel as nib
    from monai.data import create_test_image_2d, create_test_image_3d
    from monai.transforms.utils import rescale_array

    rs = np.random.RandomState(seed)
    grid = np.indices((size,) * dims)
    records, i = [], 0
    for p, count in enumerate(counts):
        if task == "segmentation":
            make = create_test_image_2d if dims == 2 else create_test_image_3d
            clean, seg = make(*((size,) * dims), num_objs=3, rad_max=max(size // 6, 6), rad_min=4,
                              num_seg_classes=1, noise_max=0.0, random_state=rs)
        else:
            label = p % num_classes
            centre = rs.randint(size // 3, 2 * size // 3, size=dims)
        for _ in range(count):
            offsets = rs.randint(-2, 3, size=dims)
            rec: dict = {"image": f"img{i:04d}.nii.gz", "patient_id": f"patient{p:04d}"}
            if task == "segmentation":
                # as create_test_image_2d/3d make noise: the larger of the object and uniform noise, rescaled
                img = rescale_array(np.maximum(_shift(clean, offsets), rs.uniform(0, 0.3, size=clean.shape)))
                mask = _shift(seg, offsets)
                nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), os.path.join(folder, f"seg{i:04d}.nii.gz"))
                rec["label"] = f"seg{i:04d}.nii.gz"
            else:
                img = rs.normal(0.0, 1.0, (size,) * dims)
                if label:
                    img += _ball(grid, centre + offsets, label, size, contrast)
                rec["label"] = int(label)
            nib.save(nib.Nifti1Image(np.asarray(img, dtype=np.float32), np.eye(4)), os.path.join(folder, rec["image"]))
            records.append(rec)
            i += 1
    return records
