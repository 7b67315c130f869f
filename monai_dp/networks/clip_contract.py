"""What every clipping engine returns, and the pieces its engines share.

An engine (:class:`~monai_dp.networks.GhostClipping`, :class:`~monai_dp.networks.PerSampleGradients`) computes,
for one physical batch of rows that come from ``num_items`` sampled items, the sum over items of each item's
gradient clipped to norm ``max_grad_norm`` (:class:`ClippedSum`). Both clip with Opacus' formula
``min(1, C / (||g_i|| + 1e-6))``; the DP optimizer then only adds the noise (see
:mod:`monai_dp.engines.optimizer`).

This module imports neither engine, so both can import it (:mod:`monai_dp.networks.clipping` builds on all three).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ClippedSum", "clip_and_sum", "trainable_parameters"]


class ClippedSum(NamedTuple):
    """The result of ``clipped_sum`` (the same for every engine).

    Attributes:
        summed: ``{name: tensor}`` for every trainable parameter of the network (``requires_grad``), of the
            parameter's shape and dtype: ``sum_i g_i min(1, C / (||g_i|| + 1e-6))`` over the items ``i``.
        norms: ``(num_items,)`` every item's gradient norm over all trainable parameters, before clipping.
        losses: ``(rows,)`` the loss of every row, detached.
        preds: ``(rows, ...)`` the prediction of every row, detached.
    """

    summed: dict[str, torch.Tensor]
    norms: torch.Tensor
    losses: torch.Tensor
    preds: torch.Tensor


def trainable_parameters(network: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an engine differentiates: ``requires_grad``, by name, in ``named_parameters`` order."""
    return {n: p for n, p in network.named_parameters() if p.requires_grad}


def clip_and_sum(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                 max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip per-item gradients and sum them, exactly as Opacus' ``DPOptimizer.clip_and_accumulate`` (1.6.0) does.

    Args:
        grads: ``{name: (num_items, *param.shape)}`` per-item gradients.
        params: ``{name: parameter}`` (same keys): the sum is cast to each parameter's dtype, as Opacus does.
        max_grad_norm: the clipping bound ``C``.

    Returns:
        ``(summed, norms)``: ``summed[name]`` of the parameter's shape and dtype and ``norms`` ``(num_items,)``.
        Same operations in the same order as Opacus (per-parameter norms, their norm, the clip factor, one
        ``einsum`` per parameter), so the sum is bit-identical to what Opacus' optimizer accumulates.
    """
    flat = list(grads.values())
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in flat]
    device = per_param[0].device
    norms = torch.stack([n.to(device) for n in per_param], dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {}
    for name, g in grads.items():
        dtype = params[name].dtype
        summed[name] = torch.einsum("i,i...", factor.to(g.device).to(dtype), g.to(dtype))
    return summed, norms
