"""Pieces the monai_dp bundles share: record loading, fixed feature extraction and metric output transforms."""

from .features import precompute_features
from .outputs import from_engine_stacked
from .transforms import LoadRecordd

__all__ = ["LoadRecordd", "from_engine_stacked", "precompute_features"]
