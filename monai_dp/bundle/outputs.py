"""Output transforms for Ignite metrics in bundle configs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["from_engine_stacked"]


def from_engine_stacked(keys: Sequence[str]) -> Callable[[Any], tuple[torch.Tensor, ...]]:
    """Like ``monai.handlers.from_engine`` but stacks decollated items into batch tensors.

    Ignite's ``Accuracy`` wants ``(y_pred (B, C), y (B,))`` tensors, while MONAI engines hand handlers a
    decollated list of dicts.
    """

    def _stack(values: Sequence[Any]) -> torch.Tensor:
        out = torch.stack([torch.as_tensor(v) for v in values])
        return out.squeeze(-1) if out.ndim == 2 and out.shape[-1] == 1 else out

    def _transform(output: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(output, dict):  # a batch that was not decollated
            return tuple(torch.as_tensor(output[k]) for k in keys)
        return tuple(_stack([item[k] for item in output]) for k in keys)

    return _transform
