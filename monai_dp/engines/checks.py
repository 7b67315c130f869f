"""Checks of a DP step's values before its update: a broken record stops training, named."""

from __future__ import annotations

from typing import Any

import torch
from monai.utils.enums import CommonKeys as Keys

from monai_dp.utils.errors import NonFiniteGradientError

__all__ = ["check_finite", "record_name"]


def check_finite(row_losses: torch.Tensor, item_norms: torch.Tensor, groups: torch.Tensor, first_row: int,
                 state: Any) -> None:
    """Raise before the update when a row's loss or an item's gradient norm is NaN or infinite.

    A non-finite gradient would turn the clipped sum (and so the model) into NaN, or be silently clipped to zero;
    either way the record is broken and training must stop, naming it (``state``: the engine's, for the batch,
    the epoch and the iteration).
    """
    bad_rows = ~torch.isfinite(row_losses.reshape(-1))
    bad_items = ~torch.isfinite(item_norms.reshape(-1))
    if not (bool(bad_rows.any()) or bool(bad_items.any())):
        return
    if bool(bad_rows.any()):
        row, what = int(bad_rows.nonzero()[0]), "loss"
    else:
        row, what = int((groups == int(bad_items.nonzero()[0])).nonzero()[0]), "gradient"
    row += first_row
    raise NonFiniteGradientError(
        f"The {what} of {record_name(state.batch, row)} is not finite (NaN or inf) at epoch {state.epoch}, "
        f"iteration {state.iteration}. Nothing of this step was applied; it is accounted as taken. "
        "Check that record (non-finite or extreme pixel values, a label outside the classes) and its "
        "transforms, e.g. add ScaleIntensityd or NormalizeIntensityd.")


def record_name(batch: Any, row: int) -> str:
    """The record a batch row came from: its file name where MONAI's metadata has one, else its row."""
    names = None
    if isinstance(batch, dict):
        image = batch.get(Keys.IMAGE)
        meta = getattr(image, "meta", None)
        if not isinstance(meta, dict):
            meta = batch.get(f"{Keys.IMAGE}_meta_dict")
        if isinstance(meta, dict):
            names = meta.get("filename_or_obj")
    if isinstance(names, (list, tuple)) and 0 <= row < len(names):
        return f"record {names[row]!r} (row {row} of the batch)"
    return f"row {row} of the batch"
