"""Collation that keeps track of which rows come from which sampled item, and survives empty batches.

A multi-crop transform such as ``RandCropByPosNegLabeld(num_samples=4)`` turns one sampled image into
four rows of the batch. The privacy analysis counts the sampled *item*, so the trainer must clip
the sum of the four rows' gradients, not each row. :class:`DPCollate` records, for every row of the
collated batch, the index of the item it came from (``dp_group``). It mirrors MONAI's
``list_data_collate``, which flattens an item that is a list into several rows.

Poisson sampling can draw an empty batch. Collating it with MONAI's collate fails on string metadata,
so :class:`DPCollate` returns an empty-batch marker instead; the trainer then takes a noise-only step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from monai_dp.utils.validation import error_message

__all__ = ["EMPTY_BATCH_KEY", "GROUP_KEY", "DPCollate", "GroupedBatch", "get_row_groups", "is_empty_batch"]

GROUP_KEY = "dp_group"
EMPTY_BATCH_KEY = "dp_empty_batch"


class GroupedBatch(list):
    """A collated sequence batch (e.g. ``[images, labels]``) that carries its row-to-item map in ``dp_group``."""

    dp_group: torch.Tensor


def _rows_per_item(items: Sequence[Any]) -> list[int]:
    # same rule as monai.data.utils.list_data_collate: if the first item is a list, every item is flattened
    if isinstance(items[0], list):
        return [len(item) for item in items]
    return [1] * len(items)


class DPCollate:
    """Wrap a collate function so that each batch carries ``dp_group`` and empty batches are marked.

    Args:
        collate_fn: the collate function of the original loader (MONAI's ``list_data_collate`` by default).
    """

    def __init__(self, collate_fn: Callable | None = None) -> None:
        if isinstance(collate_fn, DPCollate):
            collate_fn = collate_fn.collate_fn
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __call__(self, items: Sequence[Any]) -> Any:
        if len(items) == 0:
            return {EMPTY_BATCH_KEY: True}
        counts = _rows_per_item(items)
        groups = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts, dtype=torch.long))
        if isinstance(items[0], list):  # flatten here, so any collate_fn sees one row per entry
            items = [row for item in items for row in item]
        batch = self.collate_fn(items)
        if isinstance(batch, Mapping):
            batch = dict(batch)
            batch[GROUP_KEY] = groups
            return batch
        if isinstance(batch, (list, tuple)):
            out = GroupedBatch(batch)
            out.dp_group = groups
            return out
        if all(c == 1 for c in counts):  # one row per item: the trainer's default map is right
            return batch
        raise TypeError(
            error_message(
                "collate_fn output", "a dict or a sequence of tensors", type(batch).__name__,
                "Return a dict (MONAI dictionary transforms) or an (image, label) tuple from the collate function.",
            )
        )


def is_empty_batch(batch: Any) -> bool:
    """Whether ``batch`` is the marker :class:`DPCollate` returns for an empty Poisson batch."""
    return isinstance(batch, Mapping) and bool(batch.get(EMPTY_BATCH_KEY, False))


def get_row_groups(batch: Any) -> torch.Tensor | None:
    """The row-to-item map of a batch made by :class:`DPCollate`, or ``None`` if it has none."""
    if isinstance(batch, Mapping):
        return batch.get(GROUP_KEY)
    return getattr(batch, "dp_group", None)
