"""The DP optimizer's patch of Opacus (monai_dp/engines/optimizer.py) against the Opacus internals it relies on.

Each test fails if Opacus changes what the patch assumes: the private processed-flag helpers, the order in which
``pre_step`` calls the three overridden methods, ``accumulated_iterations``, the distributed optimizer's
``rank``/``world_size``; and the patched update must equal Opacus' own on the same inputs and noise generator.
"""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from monai_dp.engines.optimizer import (
    PrivateNoiseDistributedDPOptimizer,
    PrivateNoiseDPOptimizer,
)
from monai_dp.networks.clip_contract import clip_and_sum

CLIP = 1.0
SHAPES = [(3, 4), (5,)]


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]


def _per_item(rows: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(rows, *s, generator=gen) for s in SHAPES]


def _optimizer(cls, params, **kw):
    kw.setdefault("noise_multiplier", 0.7)
    return cls(torch.optim.SGD(params, lr=0.5), max_grad_norm=CLIP, expected_batch_size=6,
               generator=torch.Generator().manual_seed(1), **kw)


def test_opacus_processed_flag_helpers_behave_as_the_patch_expects():
    fresh = torch.zeros(2)
    _check_processed_flag(fresh)  # a fresh tensor passes
    _check_processed_flag([torch.zeros(1), torch.zeros(1)])
    _mark_as_processed(fresh)
    assert fresh._processed is True
    with pytest.raises(ValueError, match=r"Gradients haven't been cleared since the last optimizer step"):
        _check_processed_flag(fresh)
    pair = [torch.zeros(1), torch.zeros(1)]
    _mark_as_processed(pair)
    with pytest.raises(ValueError, match=r"Gradients haven't been cleared"):
        _check_processed_flag([torch.zeros(1), pair[1]])


@pytest.mark.parametrize("cls", [DPOptimizer, PrivateNoiseDPOptimizer])
def test_pre_step_calls_clip_and_accumulate_then_add_noise_then_scale_grad(cls):
    calls = []

    class Recording(cls):
        def clip_and_accumulate(self):
            calls.append("clip_and_accumulate")
            return super().clip_and_accumulate()

        def add_noise(self):
            calls.append("add_noise")
            return super().add_noise()

        def scale_grad(self):
            calls.append("scale_grad")
            return super().scale_grad()

    params = _params()
    opt = _optimizer(Recording, params)
    for p, g in zip(params, _per_item(6)):
        p.grad_sample = g
    opt.signal_skip_step(do_skip=True)
    opt.step()  # a skipped step only clips and accumulates, and keeps the sum for the next one
    assert calls == ["clip_and_accumulate"] and opt._is_last_step_skipped
    opt.zero_grad()
    assert all(p.summed_grad is not None and p.grad_sample is None for p in params)
    for p, g in zip(params, _per_item(6, seed=1)):
        p.grad_sample = g
    calls.clear()
    opt.step()
    assert calls == ["clip_and_accumulate", "add_noise", "scale_grad"] and not opt._is_last_step_skipped


def test_accumulated_iterations_counts_grad_sample_tensors():
    """``scale_grad`` reads ``accumulated_iterations`` once: 1 for a tensor, the list's length for a list."""
    params = _params()
    opt = _optimizer(PrivateNoiseDPOptimizer, params)
    for p, g in zip(params, _per_item(0)):
        p.grad_sample = g
    assert opt.accumulated_iterations == 1
    for p, g, h in zip(params, _per_item(2), _per_item(3, seed=1)):
        p.grad_sample = [g, h]
    assert opt.accumulated_iterations == 2


def _step(cls, case):
    params = _params()
    opt = _optimizer(cls, params)
    opt.flat_noise = False  # Opacus' per-tensor noise stream (the flat draw is tested in test_flat_noise.py)
    per_item = _per_item(0 if case == "empty" else 6)
    if case == "clipped sum" and cls is PrivateNoiseDPOptimizer:  # the trainer's way: clipped by the clipper
        summed = clip_and_sum(dict(enumerate(per_item)), dict(enumerate(params)), CLIP)[0]
        for i, p in enumerate(params):
            p.summed_grad = summed[i]
            p.grad_sample = torch.zeros((0, *p.shape))
    elif case == "two grad_sample tensors":
        for p, g, h in zip(params, per_item, _per_item(4, seed=1)):
            p.grad_sample = [g, h]
    else:
        for p, g in zip(params, per_item):
            p.grad_sample = g
    opt.step()
    return [p.detach().clone() for p in params], opt, params


@pytest.mark.parametrize("case", ["per-item gradients", "empty", "clipped sum", "two grad_sample tensors"])
def test_patched_update_equals_opacus_own(case):
    """Same parameters after one step as Opacus' DPOptimizer (which clips ``grad_sample`` itself), bit for bit."""
    ours, opt, params = _step(PrivateNoiseDPOptimizer, case)
    theirs, _, _ = _step(DPOptimizer, case)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(ours, _params()))  # the step moved the parameters
    with pytest.raises(ValueError, match=r"Gradients haven't been cleared"):  # the used-twice guard is kept
        opt.step()
    opt.zero_grad()
    assert all(p.summed_grad is None and p.grad_sample is None for p in params)


def test_noise_only_from_the_optimizer_generator():
    params = _params()
    opt = _optimizer(PrivateNoiseDPOptimizer, params, noise_multiplier=1.0)
    opt.generator = None
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape))
    with pytest.raises(RuntimeError, match=r"needs a generator of its own"):
        opt.step()


@pytest.fixture
def single_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_distributed_optimizer_rank_attributes_and_update(single_process_group):
    updates = []
    for cls in (DistributedDPOptimizer, PrivateNoiseDistributedDPOptimizer):
        params = _params()
        opt = _optimizer(cls, params)
        opt.flat_noise = False  # Opacus' per-tensor noise stream
        assert (opt.rank, opt.world_size) == (0, 1)  # set by Opacus' __init__, read by the patch's add_noise
        for p, g in zip(params, _per_item(6)):
            p.grad_sample = g
        opt.step()
        updates.append([p.detach().clone() for p in params])
        # a follower rank adds no noise: its grad is its own clipped sum
        opt.zero_grad()
        opt.rank, opt.world_size = 1, 2
        for p, g in zip(params, _per_item(6)):
            p.grad_sample = g
        opt.clip_and_accumulate()
        opt.add_noise()
        updates.append([p.grad.clone() for p in params])
        assert all(torch.equal(p.grad, p.summed_grad) for p in params)
    half = len(updates) // 2
    for mine, theirs in zip(updates[half:], updates[:half]):
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [DPOptimizer, PrivateNoiseDPOptimizer])
@pytest.mark.parametrize("rows", [0, 6])
def test_a_grad_sample_is_never_used_twice(cls, rows):
    """After a skipped step (clip only) the same ``grad_sample`` cannot be accumulated again: Opacus' guard, kept
    by the patch's empty-batch path too."""
    params = _params()
    opt = _optimizer(cls, params)
    for p, g in zip(params, _per_item(rows)):
        p.grad_sample = g
    opt.signal_skip_step(do_skip=True)
    opt.step()
    with pytest.raises(ValueError, match=r"Gradients haven't been cleared"):
        opt.step()
