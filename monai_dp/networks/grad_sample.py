"""Per-sample gradients of a whole network with ``torch.func.vmap`` and expanded weights.

Why not Opacus' ``GradSampleModule``: its hook mode needs a grad sampler per layer type and breaks
on MONAI's residual blocks (``out += residual`` modifies a hooked output in place: ResNet,
SegResNet) and its ``ew`` mode fails on DenseNet121, UNet (PReLU) and BasicUNet (transposed
convolutions). Differentiating the whole network per example with ``torch.func`` has neither
limitation: every layer autograd supports is supported, and each example is run alone (batch of
one) against its own expanded view of the weights, so nothing can couple examples and the gradient
with respect to that view is the example's exact autograd gradient. One forward and one backward
pass, as in ordinary training; the loss is called outside ``vmap`` on each example, so MONAI losses
whose internals ``vmap`` cannot batch (``one_hot`` uses an in-place scatter) work unchanged.

Rows of the batch that come from one sampled item (multi-crop transforms) are summed before
clipping (``groups``), so the clip bounds the item's whole contribution.

Both methods (``vmap_grad`` and ``expanded``) run every row alone, as a batch of one under ``vmap``, so a
module that mixes the rows of a batch (``x - x.mean(0)``, attention across the batch) only ever sees one row:
each item's gradient depends on that item alone and the clipped sum moves by at most ``C`` when an item is
added (tests/networks/test_row_independence.py). The price is that such a network is trained as it computes
on a batch of one, which differs from its batched forward at inference; ghost clipping, which uses the
batched forward, refuses such modules instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from monai_dp.networks.clip_contract import (
    ClippedSum,
    clip_and_sum,
    trainable_parameters,
)
from monai_dp.utils.errors import DPIncompatibleModuleError
from monai_dp.utils.validation import check_choice, check_positive, error_message

__all__ = ["PerSampleGradients", "per_sample_loss"]

logger = logging.getLogger(__name__)


def per_sample_loss(value: torch.Tensor) -> torch.Tensor:
    """Reduce the loss of a one-example batch to a scalar, as MONAI's trainer does (``.mean()``).

    Raises ``ValueError`` if the output has a leading dimension other than 1: it is then not a loss of
    that one example.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(error_message("loss_function output", "a torch.Tensor", type(value).__name__))
    if value.ndim > 0 and value.shape[0] != 1:
        raise ValueError(
            error_message(
                "loss_function output for one example", "a scalar or a tensor of shape (1, ...)", tuple(value.shape),
                "The loss must give one value per example (reduction='mean', 'sum' or 'none' over a batch of one).",
            )
        )
    return value.float().mean()


class PerSampleGradients:
    """Compute the loss gradient of every sampled item, with rows of one item summed.

    Args:
        network: the (plain, unwrapped) network; its parameters with ``requires_grad`` are differentiated.
        loss_function: MONAI/torch loss called as ``loss_function(pred, target)`` on a batch of one.
        inferer: called as ``inferer(inputs, network_fn)``; ``None`` calls the network directly.
    """

    METHODS = ("auto", "vmap_grad", "expanded")

    def __init__(self, network: nn.Module, loss_function: Callable, inferer: Callable | None = None,
                 method: str = "auto") -> None:
        self.network = network
        self.loss_function = loss_function
        self.inferer = inferer
        self.method = check_choice("method", method, self.METHODS)

    name = "per_sample"

    def trainable(self) -> dict[str, nn.Parameter]:
        return trainable_parameters(self.network)

    def _locations(self) -> dict[str, list[tuple[dict, str]]]:
        """Every ``(module._parameters, attr)`` slot that holds each trainable parameter.

        A parameter can sit in several slots: a module reachable by two paths (DynUNet's skip layers) or
        weights tied across modules. ``torch.func.functional_call`` restores such slots incorrectly (the
        module keeps the batched tensor), so the swap is done here, once per slot.
        """
        by_id = {id(p): n for n, p in self.trainable().items()}
        slots: dict[str, list[tuple[dict, str]]] = {n: [] for n in by_id.values()}
        for m in self.network.modules():
            for attr, p in m._parameters.items():
                if p is not None and id(p) in by_id:
                    slots[by_id[id(p)]].append((m._parameters, attr))
        return slots

    def _forward(self, batched_params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Run every row alone (a batch of one) with its own copy of the weights; returns ``(R, 1, ...)``."""
        network, inferer, slots = self.network, self.inferer, self._locations()

        def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            saved = [(store, attr, store[attr]) for name in params for store, attr in slots[name]]
            try:
                for name, t in params.items():
                    for store, attr in slots[name]:
                        store[attr] = t
                x1 = x.unsqueeze(0)
                return inferer(x1, network) if inferer is not None else network(x1)
            finally:
                for store, attr, orig in reversed(saved):
                    store[attr] = orig

        return vmap(one, in_dims=(0, 0), randomness="different")(batched_params, inputs)

    def __call__(
        self,
        inputs: torch.Tensor,
        targets: Any,
        groups: torch.Tensor | None = None,
        num_items: int | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-item gradients.

        Each row runs through the network alone with its own (expanded, not copied) view of the weights, so the
        gradient with respect to that view is the row's gradient ("expanded weights"); the loss is then called
        on each row's prediction and target as a batch of one, exactly as MONAI would call it, so any loss works
        and none can pool over the batch.

        Args:
            inputs: ``(R, ...)`` rows of the batch.
            targets: ``(R, ...)`` targets, one per row.
            groups: ``(R,)`` index of the item each row comes from (``0 .. num_items-1``); ``None``: one row per item.
            num_items: number of items; defaults to ``groups.max() + 1``.
            amp_dtype: autocast dtype (``torch.bfloat16``) or ``None``.

        Returns:
            ``(grads, losses, preds)``: ``grads[name]`` of shape ``(num_items, *param.shape)`` (float32 sums of
            the item's rows), ``losses`` ``(R,)`` and ``preds`` ``(R, ...)``, both detached.
        """
        rows = inputs.shape[0]
        trainable = self.trainable()
        ctx = torch.autocast(inputs.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        row_grads = None
        if self.method == "auto":
            row_grads, losses, preds = self._choose_method(trainable, inputs, targets, ctx)
        elif self.method == "vmap_grad":
            row_grads, losses, preds = self._vmap_grad(trainable, inputs, targets, ctx)
        if row_grads is None:
            row_grads, losses, preds = self._expanded(trainable, inputs, targets, ctx)
        g = rows if groups is None else (int(groups.max().item()) + 1 if num_items is None else int(num_items))
        grads = {}
        for name, rg in row_grads.items():
            shape = trainable[name].shape
            if rg is None:
                grads[name] = torch.zeros((g, *shape), dtype=torch.float32, device=inputs.device)
                continue
            rg = rg.to(torch.promote_types(rg.dtype, torch.float32))
            if groups is None:
                grads[name] = rg
            else:
                out = torch.zeros((g, *shape), dtype=rg.dtype, device=rg.device)
                grads[name] = out.index_add_(0, groups.to(rg.device), rg)
        return grads, losses.detach(), preds

    def clipped_sum(self, inputs: torch.Tensor, targets: Any, groups: torch.Tensor | None = None,
                    num_items: int | None = None, max_grad_norm: float = 1.0,
                    amp_dtype: torch.dtype | None = None) -> ClippedSum:
        """The clipping contract (:class:`~monai_dp.networks.clip_contract.ClippedSum`): every item's gradient
        (``__call__``), clipped and summed with exactly the operations of Opacus' ``clip_and_accumulate``."""
        c = check_positive("max_grad_norm", max_grad_norm)
        grads, losses, preds = self(inputs, targets, groups, num_items, amp_dtype)
        summed, norms = clip_and_sum(grads, self.trainable(), c)
        return ClippedSum(summed, norms.detach(), losses, preds)

    def _choose_method(self, trainable, inputs, targets, ctx):
        """``"auto"``, first call: ``vmap(grad)`` where it runs, else expanded weights (which run every loss).

        ``vmap(grad)`` is tried on one row first: a loss it cannot batch (MONAI's Dice family: ``one_hot`` scatters
        in place) fails there at the cost of one row, not of a whole batch's forward pass. Returns this batch's
        ``(row_grads, losses, preds)`` from ``vmap(grad)``, or ``(None, None, None)`` to use expanded weights.
        """
        try:
            self._vmap_grad(trainable, inputs[:1], None if targets is None else targets[:1], ctx)
            result = self._vmap_grad(trainable, inputs, targets, ctx)
        except Exception as e:  # noqa: BLE001 - any failure: use the method that works with every loss
            logger.debug("vmap(grad) raised %s: %s", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            logger.info("Per-sample gradients: expanded weights (vmap does not support this network or loss).")
            self.method = "expanded"
            return None, None, None
        logger.info("Per-sample gradients: vmap(grad).")
        self.method = "vmap_grad"
        return result

    def _expanded(self, trainable, inputs, targets, ctx):
        """Expanded weights: one batched forward (each row alone), the loss per row outside ``vmap``."""
        rows = inputs.shape[0]
        batched = {n: p.detach().unsqueeze(0).expand(rows, *p.shape).requires_grad_() for n, p in trainable.items()}
        try:
            with ctx:
                preds = self._forward(batched, inputs)
        except (RuntimeError, ValueError, TypeError) as e:
            raise self._explain_failure(e, inputs) from e
        with ctx:
            losses = torch.stack([
                per_sample_loss(self.loss_function(preds[i], targets[i : i + 1] if targets is not None else None))
                for i in range(rows)
            ])
        names = list(batched)
        grads = torch.autograd.grad(losses.sum(), [batched[n] for n in names], allow_unused=True)
        return dict(zip(names, grads)), losses.detach(), preds.detach().reshape(rows, *preds.shape[2:])

    def _vmap_grad(self, trainable, inputs, targets, ctx):
        """``vmap(grad(loss))``: faster where the loss itself can run under ``vmap`` (cross-entropy, MSE)."""
        network, loss_function, inferer = self.network, self.loss_function, self.inferer
        params = {n: p.detach() for n, p in trainable.items()}
        slots = self._locations()

        def row_loss(p, x, y):
            saved = [(store, attr, store[attr]) for name in p for store, attr in slots[name]]
            try:
                for name, t in p.items():
                    for store, attr in slots[name]:
                        store[attr] = t
                with ctx:
                    x1 = x.unsqueeze(0)
                    pred = inferer(x1, network) if inferer is not None else network(x1)
                    loss = per_sample_loss(loss_function(pred, y.unsqueeze(0)))
            finally:
                for store, attr, orig in reversed(saved):
                    store[attr] = orig
            return loss, (loss.detach(), pred.detach())

        fn = vmap(grad(row_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
        grads, (losses, preds) = fn(params, inputs, targets)
        return grads, losses, preds.reshape(inputs.shape[0], *preds.shape[2:])

    def _explain_failure(self, error: Exception, inputs: torch.Tensor) -> Exception:
        """Re-run one example with module hooks to name the innermost layer where the failure happened."""
        stack: list[str] = []
        failed: list[str] = []
        handles = []

        def pre(name):
            def hook(_m, _a):
                stack.append(name)
            return hook

        def post(_m, _a, _o):
            if stack:
                stack.pop()

        for name, m in self.network.named_modules():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post))
        try:
            params = {n: p.detach().unsqueeze(0) for n, p in self.trainable().items()}
            with torch.no_grad():
                self._forward(params, inputs[:1])
        except Exception:  # noqa: BLE001 - we only want the layer path
            failed = list(stack)
        finally:
            for h in handles:
                h.remove()
        path = failed[-1] if failed else "<loss_function or inferer>"
        layer = type(self.network.get_submodule(path)).__name__ if failed and path else "?"
        return DPIncompatibleModuleError(
            [(path or "<root>", f"per-sample gradients failed in {layer}: {type(error).__name__}: {error}",
              "replace the layer with one that processes each example independently, or report it to monai_dp.")]
        )
