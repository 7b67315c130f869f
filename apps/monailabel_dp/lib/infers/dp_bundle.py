"""MONAI Label's ``BundleInferTask`` for a DP bundle, loading its weights strictly.

The DP bundles' ``network_def`` is the network as trained (BatchNorm already converted), so ``model.pt`` must
load with ``strict=True``: a key that does not match is an error, never a model served with random layers.
"""

from __future__ import annotations

from monailabel.tasks.infer.bundle import BundleInferTask

__all__ = ["dp_bundle_infer_task"]


def dp_bundle_infer_task(path: str, conf: dict) -> BundleInferTask:
    """The inference task of the bundle at ``path``; invalid (``is_valid()`` false) until ``models/model.pt`` exists."""
    return BundleInferTask(path, conf, load_strict=True)
