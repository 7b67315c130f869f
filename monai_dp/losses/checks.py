"""Checks of the loss and of the targets it is given.

DP-SGD clips each example's gradient, which presumes each example has a loss of its own. A loss
that pools statistics over the batch (``DiceLoss(batch=True)``, anything with BatchNorm inside) has
no per-example value; the trainer evaluates losses on one example at a time, so such a loss would
silently turn into a different loss. Where the pooling is only a reduction switch (MONAI's Dice-family
``batch=True``: the batch dimension is summed together with the spatial ones), :func:`make_per_sample_loss`
switches it off and logs a WARNING naming the attribute; any other pooling is refused
(:func:`check_per_sample_loss`). ``reduction="sum"`` is accepted (and said at INFO): on a batch of one it sums
that example's elements only, so each example still has a loss of its own; it differs from ``"mean"`` by the
number of elements per example, a scale on every gradient before clipping.

Targets that are class indices out of range, fractional or not finite fail deep inside torch with a
message that differs by gradient mode and device (an index error on CPU, a device-side assert that
poisons the CUDA context on GPU), or pass silently (MONAI's one-hot truncates 1.5 to 1).
:func:`check_targets` refuses them before the loss sees them, naming the value and the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from monai_dp.utils.errors import DPConfigurationError
from monai_dp.utils.validation import error_message

__all__ = ["check_per_sample_loss", "check_targets", "make_per_sample_loss"]

logger = logging.getLogger(__name__)

_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MultiMarginLoss)
# MONAI losses whose `batch` flag only adds the batch dimension to the sums over the spatial ones: with
# batch=False each example's value depends on that example alone, and on a batch of one both settings agree.
# Exact classes only: a subclass may use the flag otherwise.
_BATCH_SWITCH_LOSSES = ("DiceLoss", "MaskedDiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "HausdorffDTLoss",
                        "LogHausdorffDTLoss", "MCCLoss", "BoundaryLoss")


def _is_batch_switch(loss: object) -> bool:
    import monai.losses

    return any(type(loss) is getattr(monai.losses, name, None) for name in _BATCH_SWITCH_LOSSES)


def _walk(loss: object, path: str, seen: set) -> Iterator[tuple[str, object]]:
    """``(path, part)`` for ``loss`` and every submodule reachable from it, each object once."""
    if id(loss) in seen:
        return
    seen.add(id(loss))
    yield path, loss
    if isinstance(loss, nn.Module):
        for name, child in loss.named_children():
            yield from _walk(child, f"{path}.{name}", seen)


def make_per_sample_loss(loss_function: Callable) -> tuple[Callable, list[str]]:
    """Switch ``batch=True`` to ``batch=False`` in place where it is a pure reduction switch, and say so.

    DP-SGD clips each example's gradient, so the trainer evaluates the loss on one example at a time; a MONAI
    Dice-family loss with ``batch=True`` (``DiceCELoss(batch=True)`` in model-zoo bundles) then computes the
    per-example loss of ``batch=False``, not the batch-pooled loss the config asked for. The flag is switched on
    the loss object itself (also inside composite losses: ``DiceCELoss.dice``) so that the loss the trainer holds
    is the loss it trains with; each change is logged as a WARNING with the attribute's path, its old and new
    value and why. Losses pooled in other ways are left as they are for :func:`check_per_sample_loss` to refuse.

    Returns:
        ``(loss_function, changed)``: the same object, and the paths of the attributes switched
        (``["loss_function.dice.batch"]``; empty when nothing needed a change).
    """
    if not callable(loss_function):
        raise TypeError(error_message("loss_function", "callable", type(loss_function).__name__))
    changed = []
    for path, part in _walk(loss_function, "loss_function", set()):
        if getattr(part, "batch", False) is True and _is_batch_switch(part):
            part.batch = False
            changed.append(f"{path}.batch")
            logger.warning(
                "%s.batch: True -> False. %s(batch=True) pools its statistics over the batch; DP-SGD clips each "
                "example's gradient, so the loss is evaluated per example, which is what batch=False computes. "
                "Set batch=False in the loss's config to make this explicit.", path, type(part).__name__)
    for path, part in _walk(loss_function, "loss_function", set()):
        if getattr(part, "reduction", None) == "sum":
            logger.info(
                "%s.reduction = 'sum': the loss is evaluated on one example at a time, so 'sum' adds up that "
                "example's elements (classes, voxels), never the batch; it is 'mean' times the elements per example, "
                "which scales each example's gradient before clipping at max_grad_norm.", path)
    return loss_function, changed


def _batch_flags(loss: object) -> list[str]:
    found = []
    for path, part in _walk(loss, "loss_function", set()):
        if getattr(part, "batch", False) is True:
            found.append(f"{path}.batch")
        if isinstance(part, nn.modules.batchnorm._BatchNorm):
            found.append(f"{path} ({type(part).__name__})")
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


def _class_index_parts(loss_function: Any) -> tuple[list[str], set[int]]:
    """What in ``loss_function`` reads targets as class indices, and the ``ignore_index`` values that all of
    those parts allow (a value only cross-entropy ignores still breaks the Dice part's one-hot)."""
    modules = loss_function.named_modules() if isinstance(loss_function, nn.Module) else [("", loss_function)]
    reasons: list[str] = []
    ignore: set[int] | None = None
    for _, m in modules:
        if isinstance(m, _INDEX_LOSSES):
            reasons.append(type(m).__name__)
        elif getattr(m, "to_onehot_y", False) is True:
            reasons.append("to_onehot_y=True")
        else:
            continue
        value = getattr(m, "ignore_index", None)
        allowed = {int(value)} if isinstance(value, int) and not isinstance(value, bool) else set()
        ignore = allowed if ignore is None else ignore & allowed
    return reasons, ignore or set()


def _are_class_indices(pred_ndim: int, num_classes: int, targets: torch.Tensor, loss_function: Any,
                       reasons: list[str]) -> bool:
    same_layout = targets.ndim == pred_ndim and targets.shape[1:2] == (num_classes,)
    if reasons:  # CE-style (B, ...) without a channel, or MONAI-style (B, 1, ...) with several classes
        return targets.ndim == pred_ndim - 1 or (targets.ndim == pred_ndim and targets.shape[1] == 1
                                                 and num_classes > 1)
    # a loss this module does not know (a function, a lambda): integer targets not laid out like pred
    return not isinstance(loss_function, nn.Module) and not targets.is_floating_point() and not same_layout


def _shown(value: float) -> int | float:
    return int(value) if math.isfinite(value) and float(value).is_integer() else value


def check_targets(pred: torch.Tensor, targets: Any, loss_function: Callable) -> None:
    """Raise ``ValueError`` if ``targets`` would make ``loss_function`` fail or silently train on other labels.

    Class-index targets (for ``CrossEntropyLoss``/``NLLLoss``, for MONAI losses with ``to_onehot_y=True``, and
    integer targets given to a loss function this check does not know) must be whole numbers in
    ``[0, num_classes)`` with ``num_classes = pred.shape[1]``, or the loss's ``ignore_index``. Targets are class
    indices when they have no channel dimension (``(B, ...)`` for ``pred`` ``(B, C, ...)``) or one channel with
    ``C > 1``; targets laid out like ``pred`` (one-hot, probabilities) and targets of other losses
    (``BCEWithLogitsLoss``, ``MSELoss``) are only required to be finite.

    Cost: one ``aminmax`` over the targets (plus one rounding pass for float class indices) and one
    synchronisation.

    Args:
        pred: a prediction of the network, of any batch size: only ``pred.ndim`` and ``pred.shape[1]`` are read,
            so the output for one row, computed once before training, serves for every batch.
        targets: the batch's targets (tensor, MetaTensor or array); ``None`` is accepted (nothing to check).
        loss_function: the training loss.
    """
    if targets is None:
        return
    t = targets.as_tensor() if hasattr(targets, "as_tensor") else torch.as_tensor(targets)
    if t.numel() == 0 or t.dtype == torch.bool or t.is_complex():
        return
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    name = type(loss_function).__name__
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = lo if not math.isfinite(lo) else hi
        raise ValueError(error_message("targets", f"finite for {name}", bad,
                                       "Check the label files and transforms (a NaN or inf label)."))
    num_classes = int(pred.shape[1]) if pred.ndim >= 2 else 1
    reasons, ignore = _class_index_parts(loss_function)
    if not _are_class_indices(pred.ndim, num_classes, t, loss_function, reasons):
        return
    what = name if isinstance(loss_function, nn.Module) else "the loss function"
    what += " with to_onehot_y=True" if "to_onehot_y=True" in reasons else "" if reasons else " with integer targets"
    if not (lo >= 0 and hi < num_classes) and ignore:
        kept = t[~torch.isin(t, torch.tensor(sorted(ignore), device=t.device, dtype=t.dtype))]
        lo, hi = (float(v) for v in torch.aminmax(kept)) if kept.numel() else (0.0, 0.0)
    if not (lo >= 0 and hi < num_classes):
        ignored = f" (or ignore_index {sorted(ignore)})" if ignore else ""
        raise ValueError(error_message(
            "targets", f"class indices in [0, {num_classes}){ignored} for {what}, as the prediction has "
            f"{num_classes} channels", _shown(lo if not lo >= 0 else hi),
            "Set the network's output channels to the number of classes, or map the label values onto "
            f"0..{num_classes - 1} (e.g. monai.transforms.MapLabelValued)."))
    if t.is_floating_point() and not torch.equal(t, torch.round(t)):
        frac = t[t != torch.round(t)].flatten()[0].item()
        raise ValueError(error_message(
            "targets", f"whole numbers (class indices) for {what}", frac,
            "Resample label masks with nearest-neighbour interpolation (mode='nearest'), not linear."))
