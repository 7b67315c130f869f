"""Deprecated: ``PrivacyAccountantHandler`` is :class:`~monai_dp.handlers.PrivacyMetricsHandler`, kept for one release.

The old name is the same class object, so ``isinstance`` checks and fully qualified config targets
(``"_target_": "monai_dp.handlers.PrivacyAccountantHandler"``) keep working; reading the name warns.
"""

from __future__ import annotations

import warnings
from typing import Any

from monai_dp.handlers.privacy_metrics_handler import PrivacyMetricsHandler

__all__ = ["PrivacyMetricsHandler"]

DEPRECATED_NAMES = {"PrivacyAccountantHandler": PrivacyMetricsHandler}


def deprecated_name(module: str, name: str) -> Any:
    """The object a deprecated ``name`` of ``module`` stands for, with a ``DeprecationWarning``."""
    if name not in DEPRECATED_NAMES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = DEPRECATED_NAMES[name]
    warnings.warn(f"`{name}` is a deprecated alias, kept for one release; use "
                  f"`{new.__module__.rsplit('.', 1)[0]}.{new.__name__}` (the same class).", DeprecationWarning,
                  stacklevel=3)
    return new


def __getattr__(name: str) -> Any:
    return deprecated_name(__name__, name)
