"""The records a bundle's ``inference.json`` predicts on: a folder of images, or a data set's test split."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from monai_dp.data import load_datalist
from monai_dp.utils.validation import error_message

__all__ = ["inference_datalist"]


def inference_datalist(data_root: str | os.PathLike, task: str, num_classes: int, spatial_dims: int,
                       image_glob: str | Sequence[str] = ("*.nii.gz", "*.nii"), seed: int = 0,
                       patient_key: str = "patient_id", val_fraction: float = 0.2,
                       test_fraction: float = 0.1) -> list[dict]:
    """``[{"image": path}, ...]`` for a folder of images, else the ``"test"`` split of the data set.

    - a folder without ``dataset.json`` and without a ``.npz`` file: every file matching ``image_glob``
      (sorted), as MONAI model-zoo inference configs do;
    - a folder with a ``dataset.json``, a MedMNIST ``.npz`` or a folder holding one: ``load_datalist``'s
      ``"test"`` split (same splitting arguments as training, so no training record is predicted on).
    """
    root = os.fspath(data_root)
    patterns = [image_glob] if isinstance(image_glob, str) else list(image_glob)
    if os.path.isdir(root) and not os.path.exists(os.path.join(root, "dataset.json")) \
            and not glob.glob(os.path.join(root, "*.npz")):
        files = sorted({f for p in patterns for f in glob.glob(os.path.join(root, p))})
        if not files:
            raise ValueError(error_message("dataset_dir", f"a folder with images matching {patterns}, a "
                                           "dataset.json or a .npz file", root,
                                           "Set `image_glob` to match your file names."))
        return [{"image": f} for f in files]
    return load_datalist(root, task, num_classes, spatial_dims, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, patient_key=patient_key)["test"]
