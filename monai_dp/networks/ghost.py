"""Mixed ghost clipping: the sum of clipped per-item gradients without materialising them all.

Bu et al. 2022 ("Scalable and efficient training of large convolutional neural networks with
differential privacy"). One batched forward records, for every layer with trainable parameters, its
input; a first backward of ``sum_rows loss_row`` records the gradient of each layer output (row by row,
since rows do not interact). Each item's squared gradient norm is then a sum over layers of

* Linear / convolution weights: ``||sum_t a_t g_t^T||^2`` over the item's positions ``t`` (a convolution
  is a linear layer on its unfolded input). Computed either as the *ghost norm*
  ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` (cost ~ T^2) or by materialising the item's ``d x p`` gradient
  (cost ~ T d p); the cheaper is picked per layer (``T_item^2 < d p`` -> ghost), as in mixed ghost clipping.
  Rows of one item are summed before the norm: their positions are concatenated into one sequence, which
  is exact because the item gradient is ``sum_rows sum_t a g^T``.
* Biases, GroupNorm / InstanceNorm / LayerNorm affine parameters and PReLU weights: their per-row
  gradients are small and are materialised.

The clipped sum ``sum_rows w_item(row) grad_row`` with ``w_i = min(1, C / (||g_i|| + 1e-6))`` (the formula
of Opacus' ``DPOptimizer``) then comes from book-keeping (Bu et al. 2023): each layer's weight-gradient
computation runs once on its recorded input and its row-weighted output gradient, with no second backward.
After the first call (which backpropagates to the parameters, to check that every parameter's gradient
comes through its layer and to note which layers receive a gradient) the backward runs to the input only.

Only layers whose gradient is fully determined by their input and output gradient are supported; any other
module with trainable parameters is refused at construction with its path (use ``PerSampleGradients``).

All of the above assumes that rows do not interact: row ``i`` of every activation depends on input row ``i``
only. A module that mixes rows (``x - x.mean(0)``, attention across the batch) makes the per-row norms and the
book-keeping wrong, and adding one item can move the clipped sum by many times ``C``. So every module, with or
without parameters, must be known to keep rows independent (:mod:`monai_dp.networks.row_independence`, checked
at construction and on every call, since ``train()``/``eval()`` matter), and a probe on the first batch checks
it on real data (:mod:`monai_dp.networks.row_probe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from monai_dp.networks.clip_contract import ClippedSum, trainable_parameters
from monai_dp.networks.ghost_terms import (
    _CONV,
    _CONV_T,
    _FIX,
    _conv_weight_per_row,
    _ghost_sq_norm,
    _item_sq_norm,
    _linear_terms,
    _norm_terms,
    _row_loss,
    _weighted_grads,
    unfold_nd,
)
from monai_dp.networks.row_independence import find_row_mixing_modules
from monai_dp.networks.row_probe import probe_row_independence
from monai_dp.utils.errors import DPIncompatibleModuleError
from monai_dp.utils.validation import check_choice, check_positive, error_message

__all__ = ["GhostClipping", "unfold_nd"]

# the layer kind is decided by the forward function, so a subclass that changes the computation is refused
_KINDS: dict[Callable, str] = {nn.Linear.forward: "linear", nn.GroupNorm.forward: "groupnorm",
                               nn.LayerNorm.forward: "layernorm", nn.PReLU.forward: "prelu",
                               nn.modules.instancenorm._InstanceNorm.forward: "instancenorm"}
_KINDS.update({c.forward: "conv" for c in _CONV})
_KINDS.update({c.forward: "conv_transpose" for c in _CONV_T})


def _layer_kind(module: nn.Module) -> str | None:
    return _KINDS.get(type(module).forward)


def _check_network(network: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, str, str]]]:
    """``(layers, offenders)``: the layers with trainable parameters, and every unsupported one."""
    layers, owners, offenders = {}, {}, []
    for path, module in network.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        for n, p in own:
            full = f"{path}.{n}" if path else n
            if id(p) in owners:
                offenders.append((full, (f"the parameter is shared with `{owners[id(p)]}`; ghost clipping needs "
                                  "each parameter in one layer."), "untie the weights, or " + _FIX))
            owners[id(p)] = full
        kind = _layer_kind(module)
        if kind is None:
            offenders.append((path or "<root>", (f"{type(module).__name__} holds trainable parameters "
                              f"({', '.join(n for n, _ in own)}) and is not supported by ghost clipping."), _FIX))
        elif kind == "conv_transpose" and module.padding_mode != "zeros":
            offenders.append((path, (f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not "
                              "supported."), _FIX))
        layers[path] = module
    return layers, offenders


class GhostClipping:
    """Sum of clipped per-item gradients with mixed ghost clipping (one forward, one backward, book-keeping).

    Args:
        network: the plain network (after ``make_private_compatible``); only parameters with ``requires_grad``
            count. Every module holding one must be Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, GroupNorm,
            InstanceNorm (affine), LayerNorm or PReLU, else ``DPIncompatibleModuleError`` names it.
        loss_function: called as ``loss_function(pred, target)`` on a batch of one, like ``PerSampleGradients``.
        inferer: called as ``inferer(inputs, network)`` on the whole batch; ``None`` calls the network.
        norm_method: how linear/convolution weight norms are computed: ``"mixed"`` (the cheaper of ghost norm
            and materialised per-item gradient, per layer), ``"ghost"`` or ``"materialise"`` (for tests).
        row_independent: your own module classes whose ``forward`` you have checked treats every row on its own
            (also possible globally with ``register_row_independent``); every other module must be on the
            allow-list of :mod:`monai_dp.networks.row_independence`, else ``DPIncompatibleModuleError``.
        probe_rows: rows of the first batch the row-independence probe runs on (3 forward passes without
            gradient); 0 turns the probe off (the allow-list still applies).

    Raises:
        DPIncompatibleModuleError: at construction, or on a call (mode-dependent layers such as BatchNorm in
            train mode, an inferer set later, the probe on the first batch), listing every offending module.
    """

    NORM_METHODS = ("mixed", "ghost", "materialise")
    name = "ghost"

    def __init__(self, network: nn.Module, loss_function: Callable, inferer: Callable | None = None,
                 norm_method: str = "mixed", row_independent: Sequence[type] = (), probe_rows: int = 4) -> None:
        self.norm_method = check_choice("norm_method", norm_method, self.NORM_METHODS)
        if not (isinstance(probe_rows, int) and (probe_rows == 0 or probe_rows >= 2)):
            raise ValueError(error_message("probe_rows", "0 (no probe) or an integer >= 2", probe_rows))
        self.network = network
        self.loss_function = loss_function
        self.inferer = inferer
        self.row_independent = tuple(row_independent)
        self.probe_rows = probe_rows
        self.layers, offenders = _check_network(network)
        offenders += find_row_mixing_modules(network, inferer, self.row_independent)
        if offenders:
            raise DPIncompatibleModuleError(offenders)
        self._probed = probe_rows == 0
        self._reached: set[str] | None = None  # layers that got an output gradient in the checked first call
        self._input_only = True  # False once a layer was found whose gradient does not depend on the input
        self._vmap_loss: bool | None = None  # whether the loss runs under vmap (decided on first use)
        self.last_choice: dict[str, str] = {}  # layer path -> "ghost" / "materialise" (weight norm, last call)

    def trainable(self) -> dict[str, nn.Parameter]:
        return trainable_parameters(self.network)

    def clipped_sum(self, inputs: torch.Tensor, targets: Any, groups: torch.Tensor | None = None,
                    num_items: int | None = None, max_grad_norm: float = 1.0,
                    amp_dtype: torch.dtype | None = None) -> ClippedSum:
        """The clipping contract (:class:`~monai_dp.networks.clip_contract.ClippedSum`); same as ``__call__``."""
        return ClippedSum(*self(inputs, targets, groups, num_items, max_grad_norm, amp_dtype))

    def __call__(self, inputs: torch.Tensor, targets: Any, groups: torch.Tensor | None = None,
                 num_items: int | None = None, max_grad_norm: float = 1.0, amp_dtype: torch.dtype | None = None):
        """Clipped sum of per-item gradients.

        Args:
            inputs: ``(R, ...)`` rows; targets: ``(R, ...)`` one per row.
            groups: ``(R,)`` long, item index of every row (``0 .. num_items-1``); ``None``: one item per row.
            num_items: number of items; defaults to ``groups.max() + 1``.
            max_grad_norm: clipping bound ``C``.
            amp_dtype: autocast dtype (``torch.bfloat16``) of the forward pass, or ``None``; the norms are then
                computed from the recorded activations and output gradients cast to float32.

        Returns:
            ``(summed, norms, losses, preds)``: ``summed[name]`` of ``param.shape`` is
            ``sum_i g_i min(1, C / (||g_i|| + 1e-6))``; ``norms (num_items,)`` the per-item norms over all
            trainable parameters; ``losses (R,)`` and ``preds (R, ...)`` detached.
        """
        c = check_positive("max_grad_norm", max_grad_norm)
        self.check_row_independence(inputs)
        rows = inputs.shape[0]
        groups, num_items = self._groups(groups, num_items, rows, inputs.device)
        trainable = self.trainable()
        records: dict[str, list[list]] = {path: [] for path in self.layers}
        state = {"capture": True}
        handles = [m.register_forward_hook(self._hook(path, records, state)) for path, m in self.layers.items()]
        ctx = torch.autocast(inputs.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        # after the first call, backpropagate to the input only: the weight gradients come from book-keeping
        through_input = self._reached is not None and inputs.is_floating_point()
        if through_input:
            inputs = inputs.detach().requires_grad_()
        try:
            with ctx:
                preds = self.inferer(inputs, self.network) if self.inferer is not None else self.network(inputs)
        finally:
            for h in handles:
                h.remove()
        with ctx:
            losses = self._row_losses(preds, targets)
        if through_input:
            torch.autograd.grad(losses.sum(), [inputs], allow_unused=True)
        else:  # the first call also checks that every parameter's gradient came through its recorded layer
            names = list(trainable)
            first = torch.autograd.grad(losses.sum(), [trainable[n] for n in names], allow_unused=True)
            self._check_coverage(records, dict(zip(names, first)), rows)
        state["capture"] = False
        reached = {path for path, calls in records.items() if any(r[1] is not None for r in calls)}
        if through_input and not reached >= self._reached:  # a layer off the input's path: use the full backward
            self._reached = None
            self._input_only = False
            return self(inputs.detach(), targets, groups, num_items, max_grad_norm, amp_dtype)
        if self._reached is None and self._input_only:
            self._reached = reached
        self._check_rows(records, rows)
        per_row_terms: dict[str, dict[str, torch.Tensor]] = {}  # small per-row gradients, reused by book-keeping
        norms = self._squared_norms(records, groups, num_items, per_row_terms).sqrt()
        weights = (c / (norms + 1e-6)).clamp(max=1.0)
        summed = self._bookkeeping(records, weights[groups], trainable, per_row_terms)
        return summed, norms.detach(), losses.detach().float(), preds.detach()

    def check_row_independence(self, inputs: torch.Tensor) -> None:
        """Raise ``DPIncompatibleModuleError`` if a module is not known to keep rows independent (every call:
        modes and the inferer can change) or, on the first batch of at least 2 rows, the probe finds mixing."""
        offenders = find_row_mixing_modules(self.network, self.inferer, self.row_independent)
        if not offenders and not self._probed and inputs.shape[0] >= 2:
            offenders = probe_row_independence(self.network, inputs, self.inferer, self.probe_rows)
            self._probed = not offenders
        if offenders:
            raise DPIncompatibleModuleError(offenders)

    def _bookkeeping(self, records, row_weights, trainable, per_row_terms) -> dict[str, torch.Tensor]:
        """``sum_rows w(row) * grad_row`` of every parameter from the recorded inputs and output gradients.

        Each layer's weight gradient is linear in its output gradient, so scaling every row's output gradient by
        its item's clip factor and running the layer's weight-gradient computation once on the batch gives the
        clipped sum (book-keeping, Bu et al. 2023), with no second backward through the network. Layers whose
        per-row gradients were already formed for the norms (normalisation layers, PReLU) weight and sum those.
        """
        summed: dict[str, torch.Tensor] = {}
        for path, module in self.layers.items():
            calls = [(x, g) for x, g in records[path] if g is not None]
            prefix = f"{path}." if path else ""
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if path in per_row_terms:
                for n, t in per_row_terms[path].items():
                    if n in own:
                        w = row_weights.to(t.dtype).reshape(-1, *([1] * (t.ndim - 1)))
                        summed[prefix + n] = (w * t).sum(0).reshape(own[n].shape)
                continue
            for x, gy in calls:
                dtype = torch.promote_types(own[next(iter(own))].dtype, torch.float32)
                x, gy = x.to(dtype), gy.to(dtype)
                gw = gy * row_weights.to(dtype).reshape(-1, *([1] * (gy.ndim - 1)))
                for n, g in _weighted_grads(module, _layer_kind(module), x, gw, own).items():
                    summed[prefix + n] = summed[prefix + n] + g if prefix + n in summed else g
        return {n: (summed[n].to(p.dtype) if n in summed else torch.zeros_like(p)) for n, p in trainable.items()}

    def _row_losses(self, preds: torch.Tensor, targets: Any) -> torch.Tensor:
        """The loss of every row as a batch of one: under ``vmap`` where the loss allows it, else row by row."""
        def one(p, t):
            return _row_loss(self.loss_function(p.unsqueeze(0), None if t is None else t.unsqueeze(0)))

        if self._vmap_loss is not False and targets is not None:
            try:
                losses = torch.func.vmap(one)(preds, targets)
                self._vmap_loss = True
                return losses
            except Exception:  # noqa: BLE001 - e.g. in-place scatter in one_hot: use the loop, which works always
                self._vmap_loss = False
        return torch.stack([one(preds[i], None if targets is None else targets[i]) for i in range(preds.shape[0])])

    @staticmethod
    def _groups(groups, num_items, rows, device):
        if groups is None:
            return torch.arange(rows, device=device), rows if num_items is None else int(num_items)
        if groups.shape != (rows,):
            raise ValueError(error_message("groups", f"a tensor of shape ({rows},) (one item index per row)",
                                           tuple(groups.shape)))
        groups = groups.to(device=device, dtype=torch.long)
        n = int(groups.max().item()) + 1 if num_items is None else int(num_items)
        if rows and not (int(groups.min()) >= 0 and int(groups.max()) < n):
            raise ValueError(error_message("groups", f"item indices in [0, {n})", groups.tolist()))
        return groups, n

    @staticmethod
    def _hook(path, records, state):
        def hook(module, args, output):
            if not state["capture"] or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            record = [args[0].detach(), None]
            records[path].append(record)

            def grad_hook(g):  # registered before any in-place change: receives the layer output's own gradient
                if state["capture"]:
                    record[1] = g.detach()

            output.register_hook(grad_hook)
        return hook

    def _check_coverage(self, records, first, rows):
        """Refuse parameters whose gradient did not come only through their layer's recorded calls."""
        offenders = []
        for path, module in self.layers.items():
            calls = [r for r in records[path] if r[1] is not None]
            prefix = f"{path}." if path else ""
            used = any(first.get(prefix + n) is not None for n, p in module.named_parameters(recurse=False))
            if used and not calls and not records[path]:
                offenders.append((path, "its parameters are used outside its forward().", _FIX))
        if offenders:
            raise DPIncompatibleModuleError(offenders)

    def _check_rows(self, records, rows):
        offenders = []
        for path in self.layers:
            bad = [r for r in records[path] if r[0].shape[0] != rows]
            if bad:
                offenders.append((path, f"was called on {bad[0][0].shape[0]} rows, not the batch's {rows}.",
                                  "call the network on the whole batch (no sliding-window inferer in training), or "
                                  + _FIX))
        if offenders:
            raise DPIncompatibleModuleError(offenders)

    def _squared_norms(self, records, groups, num_items, per_row_terms):
        dtype = torch.promote_types(next(iter(self.trainable().values())).dtype, torch.float32)
        total = torch.zeros(num_items, dtype=dtype, device=groups.device)
        counts = torch.bincount(groups, minlength=num_items)
        max_rows = int(counts.max()) if groups.numel() else 1
        if max_rows == 1 and num_items == groups.numel() and torch.equal(groups, torch.arange(num_items,
                                                                                             device=groups.device)):
            groups = None  # one item per row, in order: per-row norms need no summing by item
        for path, module in self.layers.items():
            calls = [(x.to(dtype), g.to(dtype)) for x, g in records[path] if g is not None]
            if not calls:
                continue
            kind = _layer_kind(module)
            if kind in ("linear", "conv", "conv_transpose"):
                total += self._weight_and_bias(path, module, calls, groups, num_items, max_rows).to(dtype)
            else:
                per_row: dict[str, torch.Tensor] = {}
                for x, gy in calls:
                    for n, t in _norm_terms(module, kind, x, gy).items():
                        per_row[n] = per_row[n] + t if n in per_row else t
                per_row_terms[path] = per_row
                for n, t in per_row.items():
                    p = getattr(module, n, None)
                    if p is not None and p.requires_grad:
                        total += _item_sq_norm(t, groups, num_items).to(dtype)
        return total

    def _weight_and_bias(self, path, module, calls, groups, num_items, max_rows):
        if isinstance(module, _CONV):
            positions = sum(math.prod(gy.shape[2:]) for _, gy in calls) * max_rows
            d = module.in_channels // module.groups * math.prod(module.kernel_size)
            p = module.out_channels // module.groups
            ghost = self._use_ghost(positions, d, p)
            if not ghost:  # per-row weight gradients by the convolution's own backward: no unfolded input
                self.last_choice[path] = "materialise"
                sq = torch.zeros(num_items, dtype=calls[0][0].dtype, device=calls[0][0].device)
                if module.bias is not None and module.bias.requires_grad:
                    sq += _item_sq_norm(sum(gy.flatten(2).sum(2) for _, gy in calls), groups, num_items)
                if module.weight.requires_grad:
                    sq += _item_sq_norm(sum(_conv_weight_per_row(module, x, gy) for x, gy in calls), groups,
                                        num_items)
                return sq
        terms = [_linear_terms(module, x, gy) for x, gy in calls]
        sq = torch.zeros(num_items, dtype=terms[0][0].dtype, device=terms[0][0].device)
        if module.bias is not None and module.bias.requires_grad:
            sq += _item_sq_norm(sum(t[2] for t in terms), groups, num_items)
        if not module.weight.requires_grad:
            return sq
        a = torch.cat([t[0] for t in terms], 1) if len(terms) > 1 else terms[0][0]
        g = torch.cat([t[1] for t in terms], 1) if len(terms) > 1 else terms[0][1]
        ghost = self._use_ghost(a.shape[1] * max_rows, a.shape[3], g.shape[3])
        self.last_choice[path] = "ghost" if ghost else "materialise"
        return sq + (_ghost_sq_norm(a, g, groups, num_items, max_rows) if ghost else
                     _item_sq_norm(torch.einsum("ntgd,ntgp->ngdp", a, g), groups, num_items))

    def _use_ghost(self, positions: int, d: int, p: int) -> bool:
        """Ghost norm costs ~positions^2 per item, a materialised gradient d * p: take the cheaper (mixed)."""
        if self.norm_method == "mixed":
            return positions * positions < d * p
        return self.norm_method == "ghost"
