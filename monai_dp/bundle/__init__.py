"""Pieces the monai_dp bundles share: record loading."""

from .transforms import LoadRecordd

__all__ = ["LoadRecordd"]
