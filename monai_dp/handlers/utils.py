"""Helpers shared by the privacy handlers."""

from __future__ import annotations

from typing import Any

from monai_dp.utils.validation import error_message

__all__ = ["require_dict", "require_dp_engine"]


def require_dp_engine(engine: Any) -> None:
    """Raise ``TypeError`` unless ``engine`` carries a DP trainer's ``privacy`` state."""
    if not hasattr(engine, "privacy"):
        raise TypeError(error_message("engine", "a DP trainer (with a `privacy` state)", type(engine).__name__,
                                      "Attach it to monai_dp.engines.DPSupervisedTrainer."))


def require_dict(state_dict: Any) -> dict:
    """Return ``state_dict`` if it is a dict, else raise ``TypeError``."""
    if not isinstance(state_dict, dict):
        raise TypeError(error_message("state_dict", "a dict", type(state_dict).__name__))
    return state_dict
