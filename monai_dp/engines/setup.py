"""Construction helpers of :class:`~monai_dp.engines.DPSupervisedTrainer`: fingerprints, processes, physical
chunks of a logical batch."""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["broadcast_parameters", "item_chunks", "records_fingerprint"]

logger = logging.getLogger("monai_dp.engines.trainer")


def records_fingerprint(loader: Any, patient_key: str) -> str | None:
    """Fingerprint of the training records' identifiers (``None`` when the dataset has no record list)."""
    records = getattr(getattr(loader, "dataset", None), "data", None)
    if not isinstance(records, (list, tuple)) or not records:
        return None
    from monai_dp.privacy.fingerprint import dataset_fingerprint_of_records

    try:
        return dataset_fingerprint_of_records(records, patient_key)
    except (TypeError, ValueError) as err:
        logger.warning("Could not fingerprint the training records (%s); pass `dataset_id`.", err)
        return None


def broadcast_parameters(network: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights (each rank steps its own copy with the same all-reduced update)."""
    with torch.no_grad():
        for p in network.parameters():
            torch.distributed.broadcast(p.data, src=0)
        for b in network.buffers():
            torch.distributed.broadcast(b, src=0)


def item_chunks(groups: torch.Tensor, num_items: int, size: int) -> list[tuple[int, int, int, int]]:
    """Split items ``0..num_items-1`` into runs of at most ``size`` items: ``(first, last_excl, row0, row1)``.

    Rows of one item are contiguous (collation keeps them together), so each run is a row range.
    """
    if groups.numel() > 1 and bool((groups[1:] < groups[:-1]).any()):
        raise RuntimeError("`dp_group` must be non-decreasing: rows of one item must be contiguous.")
    bounds = torch.searchsorted(groups.cpu(), torch.arange(0, num_items + 1, dtype=torch.long)).tolist()
    return [(s, min(s + size, num_items), bounds[s], bounds[min(s + size, num_items)]) for s in range(0, num_items, size)]
