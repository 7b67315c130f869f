"""Federated DP training (mirrors ``monai.fl``): per-site DP-SGD through MONAI FL's ``MonaiAlgo`` on NVIDIA FLARE.

Needs the ``fl`` extra (``pip install 'monai_dp[fl]'``): NVFlare and its Client API are imported on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DPFedAvg", "DPMonaiAlgo", "FLPrivacyKeys", "dp_fedavg_recipe", "run_simulation"]

_WHERE = {"DPMonaiAlgo": "algo", "FLPrivacyKeys": "algo", "DPFedAvg": "server", "dp_fedavg_recipe": "job",
          "run_simulation": "job"}
_PIP = "pip install 'monai_dp[fl]'"


def require_nvflare() -> None:
    """Raise ImportError with the pip command when NVFlare is missing."""
    try:
        import nvflare  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Federated training needs NVIDIA FLARE: {_PIP}.") from err


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'monai_dp.fl' has no attribute {name!r}")
    if _WHERE[name] in ("server", "job"):
        require_nvflare()
    import importlib

    return getattr(importlib.import_module(f"monai_dp.fl.{_WHERE[name]}"), name)
