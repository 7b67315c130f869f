"""Pieces the monai_dp bundles share: record loading and metric output transforms."""

from .outputs import from_engine_stacked
from .transforms import LoadRecordd

__all__ = ["LoadRecordd", "from_engine_stacked"]
