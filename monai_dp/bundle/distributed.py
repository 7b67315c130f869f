"""Which handlers run on which rank of a multi-GPU (``torchrun``) bundle run.

Every rank trains (the DP step all-reduces clipped sums) and validates its shard of the validation set
(MONAI's metrics gather across ranks), so ``ValidationHandler``, ``CheckpointLoader`` and the like run on
every rank. Handlers that write files or log run on rank 0 only; on the other ranks they would write the same
files concurrently and log ε once per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai_dp.utils.distributed import rank_world
from monai_dp.utils.validation import error_message

__all__ = ["MAIN_RANK_ONLY_HANDLERS", "handlers_for_rank", "is_main_rank"]

# class names (a subclass matches too) of the handlers that write files or log
MAIN_RANK_ONLY_HANDLERS = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "CheckpointSaver",
    "MetricsSaver",
    "ClassificationSaver",
    "PrivacyReportHandler",
)


def is_main_rank() -> bool:
    """True in a single-process run and on rank 0 of a distributed one."""
    return rank_world()[0] == 0


def handlers_for_rank(handlers: Sequence[Any] | None,
                      main_rank_only: Sequence[str] = MAIN_RANK_ONLY_HANDLERS) -> list[Any]:
    """``handlers`` on rank 0; on the other ranks, those whose class (or a base class) is not named in
    ``main_rank_only``. Handlers added to the list later (MONAI Label's ``CheckpointLoader``) stay on every rank.
    """
    if handlers is None:
        return []
    if isinstance(main_rank_only, str) or not all(isinstance(n, str) for n in main_rank_only):
        raise TypeError(error_message("main_rank_only", "a list of handler class names", main_rank_only))
    if is_main_rank():
        return list(handlers)
    names = set(main_rank_only)
    return [h for h in handlers if not names & {c.__name__ for c in type(h).__mro__}]
