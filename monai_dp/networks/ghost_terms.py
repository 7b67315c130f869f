"""The per-layer pieces of ghost clipping: unfolded inputs, per-row norm terms and weighted gradients.

Pure functions of a layer, its recorded input and its output gradient (see :mod:`monai_dp.networks.ghost`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_dp.networks.grad_sample import per_sample_loss
from monai_dp.utils.validation import error_message

__all__ = ["unfold_nd"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FIX = "use `PerSampleGradients` (monai_dp.networks.grad_sample) for this network."


def _conv_padding(module: nn.Module) -> list[tuple[int, int]]:
    """(left, right) zero padding per spatial dimension, as ``torch.nn.ConvNd`` applies it."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * len(module.kernel_size)
        out = []
        for k, d in zip(module.kernel_size, module.dilation):  # 'same': the extra pixel goes to the right
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in module.padding]


def unfold_nd(x: torch.Tensor, kernel, stride, padding, dilation, mode: str = "zeros") -> torch.Tensor:
    """im2col for 1D/2D/3D: ``(R, C, *S)`` -> ``(R, T, C * prod(kernel))``, channel-major like conv weights."""
    n = len(kernel)
    pad = [v for lr in reversed(padding) for v in lr]
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # window appended as a trailing dimension
    if any(d > 1 for d in dilation):
        x = x[(..., *[slice(None, None, d) for d in dilation])]
    x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 1 + n]), -1)


def _linear_terms(module, x, gy):
    """``(a, g, bias_grad)``: ``a (R, T, G, d)``, ``g (R, T, G, p)`` with weight grad ``sum_t a_t^T g_t`` per group."""
    rows = x.shape[0]
    if isinstance(module, nn.Linear):
        a, g, groups = x.reshape(rows, -1, x.shape[-1]), gy.reshape(rows, -1, gy.shape[-1]), 1
        bias = g.sum(1)
    elif isinstance(module, _CONV):
        a = unfold_nd(x, module.kernel_size, module.stride, _conv_padding(module), module.dilation,
                      module.padding_mode)
        g, groups = gy.flatten(2).transpose(1, 2), module.groups
        bias = gy.flatten(2).sum(2)
    else:  # transposed convolution: x = conv(y, W), so the roles of input and output gradient swap
        pad = [(p, p) for p in module.padding]
        a = unfold_nd(gy, module.kernel_size, module.stride, pad, module.dilation)
        g, groups = x.flatten(2).transpose(1, 2), module.groups
        bias = gy.flatten(2).sum(2)
        if a.shape[1] != g.shape[1]:
            raise RuntimeError(error_message(f"{type(module).__name__} output size", "consistent with its input",
                                             tuple(gy.shape), _FIX))
    a = a.reshape(rows, a.shape[1], groups, -1)
    g = g.reshape(rows, g.shape[1], groups, -1)
    return a, g, bias


def _norm_terms(module, kind, x, gy) -> dict[str, torch.Tensor]:
    """Per-row gradients ``(R, *param.shape)`` of the affine parameters of a normalisation layer or PReLU."""
    dims = tuple(range(2, x.ndim))
    if kind == "groupnorm":
        xh = F.group_norm(x, module.num_groups, eps=module.eps)
    elif kind == "instancenorm":
        stats = module.training or not module.track_running_stats
        xh = F.instance_norm(x, None if stats else module.running_mean, None if stats else module.running_var,
                             use_input_stats=stats, eps=module.eps)
    elif kind == "layernorm":
        xh = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        dims = tuple(range(1, x.ndim - len(module.normalized_shape)))
    else:  # PReLU: y = max(0, x) + w min(0, x)
        xh = x.clamp(max=0)
        dims = tuple(range(1, x.ndim)) if module.weight.numel() == 1 else tuple(range(2, x.ndim))
        return {"weight": (xh * gy).sum(dims).reshape(x.shape[0], -1)}
    return {"weight": (xh * gy).sum(dims) if dims else xh * gy, "bias": gy.sum(dims) if dims else gy}


_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _weighted_grads(module, kind, x, gw, own) -> dict[str, torch.Tensor]:
    """Gradients of ``own`` parameters of one layer call for output gradient ``gw`` (rows already weighted)."""
    out: dict[str, torch.Tensor] = {}
    if kind == "linear":
        g2, x2 = gw.reshape(-1, gw.shape[-1]), x.reshape(-1, x.shape[-1])
        if "weight" in own:
            out["weight"] = g2.T @ x2
        if "bias" in own:
            out["bias"] = g2.sum(0)
    elif kind == "conv":
        if "weight" in own:
            x, padding = _padded_input(module, x)
            out["weight"] = _CONV_WEIGHT[x.ndim - 2](x, module.weight.shape, gw, module.stride, padding,
                                                     module.dilation, module.groups)
        if "bias" in own:
            out["bias"] = gw.flatten(2).sum((0, 2))
    elif kind == "conv_transpose":
        a, g, _ = _linear_terms(module, x, gw)
        if "weight" in own:
            out["weight"] = torch.einsum("ntgd,ntgp->gpd", a, g).reshape(module.weight.shape)
        if "bias" in own:
            out["bias"] = gw.flatten(2).sum((0, 2))
    else:
        for n, t in _norm_terms(module, kind, x, gw).items():
            if n in own:
                out[n] = t.sum(0).reshape(own[n].shape)
    return out


def _padded_input(module, x) -> tuple[torch.Tensor, Any]:
    """``(x, padding)`` for the weight-gradient convolution: symmetric zero padding is passed on as is (no
    padded copy of the activation); reflect/replicate/circular or asymmetric ('same') padding is applied."""
    lr = _conv_padding(module)
    if module.padding_mode == "zeros" and all(left == right for left, right in lr):
        return x, tuple(left for left, _ in lr)
    pad = [v for side in reversed(lr) for v in side]
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x, 0


def _conv_weight_per_row(module, x, gy):
    """``(R, *weight.shape)`` gradient of a convolution's weight for every row, via its batched backward."""
    x, padding = _padded_input(module, x)
    fn, shape = _CONV_WEIGHT[x.ndim - 2], module.weight.shape

    def one(xi, gi):
        return fn(xi.unsqueeze(0), shape, gi.unsqueeze(0), module.stride, padding, module.dilation, module.groups)

    return torch.func.vmap(one)(x, gy)


def _row_loss(value: torch.Tensor) -> torch.Tensor:
    """``per_sample_loss`` (shape check, float32 mean), but kept in float64 where the loss is float64."""
    checked = per_sample_loss(value)
    return value.mean() if value.dtype == torch.float64 else checked


def _item_sq_norm(per_row: torch.Tensor, groups: torch.Tensor | None, num_items: int) -> torch.Tensor:
    """Sum the rows of each item, then the squared norm per item (``groups=None``: one item per row)."""
    if groups is None:
        return per_row.flatten(1).pow(2).sum(1)
    items = torch.zeros((num_items, *per_row.shape[1:]), dtype=per_row.dtype, device=per_row.device)
    items.index_add_(0, groups, per_row)
    return items.flatten(1).pow(2).sum(1)


def _ghost_sq_norm(a, g, groups, num_items, max_rows):
    """``||sum_t a_t^T g_t||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)`` per item, its rows' positions concatenated."""
    def gram(a_, g_):
        return (torch.einsum("ntgd,nsgd->ngts", a_, a_) * torch.einsum("ntgp,nsgp->ngts", g_, g_)).sum((1, 2, 3))

    if groups is None:
        return gram(a, g)
    if max_rows == 1:
        out = torch.zeros(num_items, dtype=a.dtype, device=a.device)
        return out.index_add_(0, groups, gram(a, g))
    out = []
    for i in range(num_items):
        rows = (groups == i).nonzero().flatten()
        if rows.numel() == 0:
            out.append(torch.zeros((), dtype=a.dtype, device=a.device))
            continue
        ai, gi = a[rows], g[rows]
        out.append(gram(ai.reshape(1, -1, *ai.shape[2:]), gi.reshape(1, -1, *gi.shape[2:]))[0])
    return torch.stack(out)
