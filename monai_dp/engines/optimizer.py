"""The DP optimizers of the trainer: Opacus' ``DPOptimizer`` with its noise from a private generator.

Two changes to Opacus, same update otherwise (tested against Opacus' own):

- the noise is always drawn from the trainer's own generator (seeded from the operating system, see
  :mod:`monai_dp.utils.randomness`), never from torch's global generator, which ``set_determinism`` seeds;
  ``secure_mode`` draws it from a cryptographic stream (:class:`~monai_dp.utils.randomness.SecureGaussian`)
  rekeyed from ``os.urandom`` before every step;
- ``scale_grad`` and ``clip_and_accumulate`` are linear, not quadratic, in the number of parameter tensors.

How the trainer uses it: the clipping is done before the optimizer, by a clipper
(:class:`~monai_dp.networks.AutoClipper`, ``clipped_sum`` per physical batch); the trainer adds the physical
batches' clipped sums, puts the total into ``p.summed_grad`` and sets ``p.grad_sample`` to an empty
``(0, *p.shape)`` tensor, then calls ``step()``. ``clip_and_accumulate`` then always takes its "no per-item
gradients" path (the clipped sum is what is already in ``summed_grad``; an empty Poisson batch, with no
``summed_grad``, gets zeros), ``add_noise`` adds the noise to that sum and ``scale_grad`` divides by the expected
batch size. Per-item gradients in ``p.grad_sample`` (Opacus' own use) are still clipped by Opacus' code.

Opacus version: checked against opacus 1.6.0. This patch relies on Opacus internals: the private
``_check_processed_flag`` / ``_mark_as_processed`` (the "gradients used twice" guard), ``DPOptimizer.pre_step``
calling ``clip_and_accumulate``, then ``add_noise``, then ``scale_grad``, ``accumulated_iterations`` and
``DistributedDPOptimizer``'s ``rank`` / ``world_size``. tests/engines/test_optimizer.py fails if any of these
changes; re-check this file against the new Opacus source before relaxing it.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from monai_dp.utils.randomness import SecureGaussian, gaussian_noise

__all__ = ["PrivateNoiseDPOptimizer", "PrivateNoiseDistributedDPOptimizer"]


class _PrivateNoiseMixin:
    """Noise from ``self.generator`` (required), and Opacus' two per-parameter loops made linear.

    ``scale_grad`` read ``accumulated_iterations`` (a loop over all parameters) once per parameter: quadratic
    (0.1-0.3 s per step for DenseNet121's 364 tensors); here it is read once. ``clip_and_accumulate`` with no
    per-item gradients (the trainer's clipper put the clipped sum in ``summed_grad``; or an empty Poisson batch)
    built and added a zero tensor per parameter; here it only does the bookkeeping Opacus checks (processed flags).
    """

    def add_noise(self) -> None:
        if getattr(self, "world_size", 1) > 1 and getattr(self, "rank", 0) != 0:  # only rank 0 adds the noise
            for p in self.params:
                p.grad = p.summed_grad.view_as(p)
            return
        if self.generator is None:
            raise RuntimeError("The DP optimizer needs a generator of its own; torch's global one is seedable.")
        if self.secure_mode:
            if not isinstance(self.generator, SecureGaussian):
                raise RuntimeError("secure_mode needs a SecureGaussian noise source (a cryptographic stream).")
            self.generator.reseed()
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = gaussian_noise(std, p.summed_grad, self.generator)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def clip_and_accumulate(self) -> None:
        if not all(isinstance(p.grad_sample, torch.Tensor) and p.grad_sample.shape[0] == 0 for p in self.params):
            return super().clip_and_accumulate()
        for p in self.params:  # every item's gradient is zero: the clipped sum is what is already there
            _check_processed_flag(p.grad_sample)
            if p.summed_grad is None:
                p.summed_grad = torch.zeros_like(p)
            _mark_as_processed(p.grad_sample)
        return None

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            scale = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= scale


class PrivateNoiseDPOptimizer(_PrivateNoiseMixin, DPOptimizer):
    pass


class PrivateNoiseDistributedDPOptimizer(_PrivateNoiseMixin, DistributedDPOptimizer):
    pass
