"""A transform that refuses label masks with values outside the declared classes, naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_dp.utils.errors import DatasetError
from monai_dp.utils.validation import error_message

__all__ = ["CheckLabelRanged"]


class CheckLabelRanged(MapTransform):
    """Raise :class:`DatasetError` if a label holds a value that is not an integer in ``[0, num_classes)``.

    A label value outside the classes would otherwise be mapped silently by one-hot encoding (or crash deep in
    the loss without naming the file).
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not num_classes >= 1:
            raise ValueError(error_message("num_classes", "an int >= 1", num_classes))
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            values = torch.unique(label)
            bad = values[(values < 0) | (values >= self.num_classes) | (values != torch.round(values))]
            if bad.numel():
                meta = getattr(d[key], "meta", {}) or {}
                source = meta.get("filename_or_obj", "<in-memory label>")
                shown = [int(v) if float(v).is_integer() else float(v) for v in bad[:5].tolist()]
                raise DatasetError(
                    f"Label {source} holds value(s) {shown} outside the classes [0, {self.num_classes}); "
                    "set num_classes or fix the mask."
                )
        return d
