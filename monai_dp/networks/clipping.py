"""One clipping interface: which engine computes the clipped sum of per-item gradients is decided here, once.

Every engine implements ``clipped_sum(inputs, targets, groups, num_items, max_grad_norm, amp_dtype) ->``
:class:`~monai_dp.networks.clip_contract.ClippedSum` (the float sums of clipped per-item gradients, by parameter
name, with the per-item norms, row losses and predictions):

* :class:`~monai_dp.networks.GhostClipping` (``"ghost"``): per-item norms without per-item gradients, the sum by
  book-keeping; supports the usual layers of MONAI's networks, refuses the rest with ``DPIncompatibleModuleError``;
* :class:`~monai_dp.networks.PerSampleGradients` (``"per_sample"``): every item's gradient materialised, then
  clipped and summed as Opacus does; supports any layer autograd supports.

:class:`AutoClipper` (built by :func:`make_clipper`) is what a trainer holds. With ``mode="auto"`` it uses ghost
clipping where it supports the network; on the first call it times both engines on that batch, compares their
clipped sums (a disagreement raises) and keeps the faster, and if ghost clipping refuses the network on a call it
falls back to per-sample gradients for good. Both give the same clipped sum, so the guarantee does not depend on
the choice. The caller adds the sums of its physical batches and leaves only the noise to the DP optimizer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from monai_dp.networks.clip_contract import (
    ClippedSum,
    clip_and_sum,
    trainable_parameters,
)
from monai_dp.networks.ghost import GhostClipping
from monai_dp.networks.grad_sample import PerSampleGradients
from monai_dp.utils.errors import DPIncompatibleModuleError
from monai_dp.utils.validation import check_choice, check_positive, error_message

__all__ = ["CLIPPING_MODES", "AutoClipper", "ClippedSum", "clip_and_sum", "cross_check", "make_clipper",
           "trainable_parameters"]

CLIPPING_MODES = ("auto", "ghost", "per_sample")

logger = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:200]


def cross_check(ghost: Any, per_sample: Any, inputs: torch.Tensor, targets: Any, groups: torch.Tensor,
                max_grad_norm: float, max_items: int = 4) -> None:
    """Ghost clipping's clipped sum against per-sample gradients on up to ``max_items`` items, in float32.

    Run whatever ``amp`` says (bf16 kernels differ by more than a tolerance, so the check runs without autocast):
    a layer ghost clipping gets wrong, e.g. one that mixes rows, shows up here as a mismatch.

    Raises:
        RuntimeError: a parameter's clipped sums differ by more than ``1e-3`` (relative, and ``1e-3 C`` absolute).
    """
    k = min(max_items, int(groups.max()) + 1)
    rows = int((groups < k).sum())
    args = (inputs[:rows], None if targets is None else targets[:rows], groups[:rows], k, max_grad_norm, None)
    ghost_sum = ghost.clipped_sum(*args).summed
    ref_sum = per_sample.clipped_sum(*args).summed
    tol = 1e-3
    for n, ref in ref_sum.items():
        if not torch.allclose(ghost_sum[n].to(ref.dtype), ref, rtol=tol, atol=tol * max_grad_norm):
            raise RuntimeError(error_message(
                f"clipped sum of `{n}`", "the same by ghost clipping and by per-sample gradients",
                f"a difference of {float((ghost_sum[n].to(ref.dtype) - ref).abs().max()):.3g}",
                "pass grad_sample_mode='per_sample' and report this network to monai_dp."))


class AutoClipper:
    """The clipped sum of per-item gradients by ghost clipping or per-sample gradients, decided in one place.

    Args:
        network: the plain network (after ``make_private_compatible``); its ``requires_grad`` parameters count.
        loss_function: called as ``loss_function(pred, target)`` on a batch of one.
        inferer: called as ``inferer(inputs, network)``; ``None`` calls the network. Settable later
            (``clipper.inferer = ...``), for both engines.
        mode: ``"ghost"`` (``DPIncompatibleModuleError`` at construction or on a call where ghost clipping does
            not support the network), ``"per_sample"``, or ``"auto"`` (ghost clipping where it supports the
            network, timed against per-sample gradients on the first call; see the module docstring).
        row_independent: module classes declared to keep rows independent, for ghost clipping
            (:class:`~monai_dp.networks.GhostClipping`).

    Attributes:
        per_sample: the :class:`~monai_dp.networks.PerSampleGradients` engine (always built: it is the fallback
            and the reference of the cross-check).
        ghost: the :class:`~monai_dp.networks.GhostClipping` engine, ``None`` once per-sample gradients are used.
        decided: whether the engine is settled (``"auto"``: after the first call).
        timings: ``{"ghost": s, "per_sample": s}`` measured by ``"auto"`` on its first call, else ``None``.
        items_seen: items whose clipped gradient :meth:`clipped_sum` returned so far (all calls; the first call's
            timing and cross-check in ``"auto"`` mode are not counted twice).
        items_clipped: of those, the items whose gradient norm exceeded the bound, i.e. whose gradient was scaled
            down (``||g_i|| + 1e-6 > C``, the clip factor is below 1). ``items_clipped / items_seen`` over an epoch
            is the fraction of clipped items that :class:`~monai_dp.handlers.PrivacyMetricsHandler` publishes with
            ``clipped_fraction_key``. Both are exact counts of the data, outside the (ε, δ) guarantee.
    """

    def __init__(self, network: nn.Module, loss_function: Callable, inferer: Callable | None = None,
                 mode: str = "auto", row_independent: Sequence[type] = ()) -> None:
        self.mode = check_choice("grad_sample_mode", mode, CLIPPING_MODES)
        self.network = network
        self.per_sample = PerSampleGradients(network, loss_function, inferer)
        self.ghost: GhostClipping | None = None
        if self.mode != "per_sample":
            try:
                self.ghost = GhostClipping(network, loss_function, inferer, row_independent=row_independent)
            except DPIncompatibleModuleError as err:
                if self.mode == "ghost":
                    raise
                logger.info("Per-sample gradients (ghost clipping does not support: %s).", _first_line(err))
        self.decided = self.mode != "auto" or self.ghost is None
        self.timings: dict[str, float] | None = None
        self.items_seen = 0
        self.items_clipped = 0

    @property
    def engine(self) -> GhostClipping | PerSampleGradients:
        """The engine that computes the next clipped sum (``"auto"``: before its first call, ghost clipping)."""
        return self.ghost if self.ghost is not None else self.per_sample

    @property
    def name(self) -> str:
        """``"ghost"`` or ``"per_sample"``: the engine in use."""
        return self.engine.name

    @property
    def inferer(self) -> Callable | None:
        return self.per_sample.inferer

    @inferer.setter
    def inferer(self, inferer: Callable | None) -> None:
        self.per_sample.inferer = inferer
        if self.ghost is not None:
            self.ghost.inferer = inferer

    def trainable(self) -> dict[str, nn.Parameter]:
        return trainable_parameters(self.network)

    def clipped_sum(self, inputs: torch.Tensor, targets: Any, groups: torch.Tensor | None = None,
                    num_items: int | None = None, max_grad_norm: float = 1.0,
                    amp_dtype: torch.dtype | None = None) -> ClippedSum:
        """The sum over items of every item's gradient clipped to ``max_grad_norm`` (one physical batch).

        Args:
            inputs: ``(R, ...)`` rows; targets: ``(R, ...)`` one per row.
            groups: ``(R,)`` long, item index of every row (``0 .. num_items-1``); ``None``: one item per row.
            num_items: number of items; defaults to ``groups.max() + 1``.
            max_grad_norm: clipping bound ``C``; every item's factor is ``min(1, C / (||g_i|| + 1e-6))``.
            amp_dtype: autocast dtype of the forward pass (``torch.bfloat16``) or ``None``.

        Returns:
            :class:`~monai_dp.networks.clip_contract.ClippedSum`.

        Raises:
            RuntimeError: ``"auto"``, first call: the two engines' clipped sums disagree.
            DPIncompatibleModuleError: ``"ghost"``: ghost clipping cannot handle the network on this call.
        """
        check_positive("max_grad_norm", max_grad_norm)
        if not self.decided:
            self._decide(inputs, targets, groups, num_items, max_grad_norm, amp_dtype)
        out = None
        if self.ghost is not None:
            try:
                out = self.ghost.clipped_sum(inputs, targets, groups, num_items, max_grad_norm, amp_dtype)
            except DPIncompatibleModuleError as err:
                if self.mode != "auto":
                    raise
                logger.info("Ghost clipping cannot handle this network (%s); using per-sample gradients.",
                            _first_line(err))
                self.ghost = None
                self.decided = True
        if out is None:
            out = self.per_sample.clipped_sum(inputs, targets, groups, num_items, max_grad_norm, amp_dtype)
        self._count_clipped(out.norms, max_grad_norm)
        return out

    def _count_clipped(self, norms: torch.Tensor, max_grad_norm: float) -> None:
        """Add this batch's items to ``items_seen`` and those whose clip factor is below 1 to ``items_clipped``."""
        self.items_seen += int(norms.numel())
        self.items_clipped += int((norms.detach().float() + 1e-6 > max_grad_norm).sum())

    def _decide(self, inputs, targets, groups, num_items, max_grad_norm, amp_dtype) -> None:
        """``"auto"``: time both engines on this batch, compare their clipped sums, keep the faster.

        Per-sample gradients that run out of GPU memory lose. Nothing computed here is returned: the chosen
        engine computes the batch again. Where ghost clipping refuses the network here, the decision is left to
        the fallback in ``clipped_sum`` (which then meets the same refusal and says why).
        """
        rows = inputs.shape[0]
        groups = torch.arange(rows, device=inputs.device) if groups is None else groups
        num_items = int(groups.max()) + 1 if num_items is None else int(num_items)
        args = (inputs, targets, groups, num_items, max_grad_norm, amp_dtype)
        sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
        try:
            self.ghost.check_row_independence(inputs)  # the one-time probe is not ghost clipping's step cost
            start = time.perf_counter()
            ghost_sum = self.ghost.clipped_sum(*args)
            sync()
            ghost_s = time.perf_counter() - start
        except DPIncompatibleModuleError:
            self.decided = True
            return
        try:
            start = time.perf_counter()
            per_sample_sum = self.per_sample.clipped_sum(*args)
            sync()
            per_sample_s = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:
            per_sample_s, per_sample_sum = float("inf"), None
        del ghost_sum, per_sample_sum
        cross_check(self.ghost, self.per_sample, inputs, targets, groups, max_grad_norm)
        if per_sample_s < ghost_s:
            self.ghost = None
        self.decided = True
        self.timings = {"ghost": ghost_s, "per_sample": per_sample_s}
        logger.info("grad_sample_mode='auto': %s (first batch: ghost clipping %.3g s, per-sample gradients %.3g s).",
                    "per-sample gradients" if self.ghost is None else "ghost clipping", ghost_s, per_sample_s)


def make_clipper(network: nn.Module, loss_function: Callable, inferer: Callable | None = None,
                 mode: str = "auto", row_independent: Sequence[type] = ()) -> AutoClipper:
    """The :class:`AutoClipper` of ``network`` for ``mode`` (``"auto"``, ``"ghost"`` or ``"per_sample"``)."""
    return AutoClipper(network, loss_function, inferer, mode, row_independent)
