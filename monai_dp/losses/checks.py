"""Refuse losses that couple the examples of a batch.

DP-SGD clips each example's gradient, which presumes each example has a loss of its own. A loss
that pools statistics over the batch (``DiceLoss(batch=True)``, anything with BatchNorm inside) has
no per-example value; the trainer evaluates losses on one example at a time, so such a loss would
silently turn into a different loss. It is refused instead.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from monai_dp.utils.errors import DPConfigurationError
from monai_dp.utils.validation import error_message

__all__ = ["check_per_sample_loss"]


def _batch_flags(loss: object, path: str = "loss_function", seen: set | None = None) -> list[str]:
    seen = set() if seen is None else seen
    if id(loss) in seen:
        return []
    seen.add(id(loss))
    found = []
    if getattr(loss, "batch", False) is True:
        found.append(f"{path}.batch")
    if isinstance(loss, nn.Module):
        for name, child in loss.named_children():
            found += _batch_flags(child, f"{path}.{name}", seen)
        for name, m in loss.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                found.append(f"{path}.{name} ({type(m).__name__})")
    return found


def check_per_sample_loss(loss_function: Callable) -> None:
    """Raise ``DPConfigurationError`` if ``loss_function`` pools over the batch; ``TypeError`` if not callable."""
    if not callable(loss_function):
        raise TypeError(error_message("loss_function", "callable", type(loss_function).__name__))
    coupled = _batch_flags(loss_function)
    if coupled:
        raise DPConfigurationError(
            error_message(
                "loss_function", "a per-example loss (no batch-level reduction) for DP training",
                f"{type(loss_function).__name__} with {', '.join(coupled)}",
                "Use batch=False: DP-SGD clips each example's gradient, so each example needs a loss of its own.",
            )
        )
