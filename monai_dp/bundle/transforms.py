"""Transforms the bundles use to read a record whatever its source: a file path or an in-memory array."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, Spacingd

__all__ = ["LoadRecordd", "TolerantSpacingd"]


def _is_dicom(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(".dcm")


class LoadRecordd(MapTransform):
    """Load ``keys`` of a record into channel-first ``MetaTensor``s.

    - a path to a NIfTI or PNG file, a DICOM file or a DICOM series folder: read with MONAI's ``LoadImage``
      (``PydicomReader`` for DICOM), then made channel-first;
    - a numpy array or tensor (MedMNIST ``.npz`` records, already channel-first): wrapped as is;
    - anything else (e.g. an int class label) is left alone.

    Reading errors name the file (MONAI's readers raise with the path).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self._load = LoadImage(image_only=True)
        self._load_dicom = LoadImage(reader="PydicomReader", image_only=True)
        self._channel_first = EnsureChannelFirst()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                path = os.fspath(value)
                img = (self._load_dicom if _is_dicom(path) else self._load)(path)
                d[key] = self._channel_first(img)
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                d[key] = MetaTensor(torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value))
        return d


class TolerantSpacingd(Spacingd):
    """MONAI's ``Spacingd`` that leaves non-dict ``<key>_*`` entries of the data alone.

    After resampling a NIfTI image, MONAI's ``Spacingd`` calls ``.update(meta)`` on every entry whose name
    starts with ``"<key>_"`` (the old ``image_meta_dict`` convention). MONAI Label puts the request's file path
    into the data as the string ``image_path``, which has no ``update``: inference crashes. This subclass
    sets such entries (anything that is not a dict) aside during the call and puts them back unchanged.
    Everything else, inversion included, is ``Spacingd``'s.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        prefixes = tuple(f"{k}_" for k in self.keys if isinstance(k, str))
        aside = {k: v for k, v in data.items()
                 if isinstance(k, str) and k.startswith(prefixes) and not isinstance(v, dict)}
        d = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        d.update(aside)
        return d
