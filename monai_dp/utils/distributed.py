"""The process's place in a ``torch.distributed`` job, asked in one place."""

from __future__ import annotations

__all__ = ["rank_world"]


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` when ``torch.distributed`` is unavailable or not
    initialised (a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
