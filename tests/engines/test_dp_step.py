"""The trainer's update equals a plainly written DP-SGD step (same noise seed), and the silent failures stay impossible."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from torch import nn

from monai_dp.data import EMPTY_BATCH_KEY, GROUP_KEY
from monai_dp.engines import DPSupervisedTrainer
from tests.conftest import TinyClassifier, make_classification_data

SIGMA, CLIP, SEED = 0.7, 0.05, 1234
MODE: dict = {}


@pytest.fixture(params=["ghost", "per_sample"])
def grad_sample_mode(request):
    """A test that asks for this runs with ghost clipping and with materialised per-sample gradients; tests that do
    not depend on how the clipped sum is computed run once."""
    MODE["value"] = request.param
    yield request.param
    MODE.clear()


def _spy_engines(trainer) -> dict:
    """Count the calls of the trainer's two clipping engines, so a test can show which one computed its step."""
    calls = {"ghost": 0, "per_sample": 0}

    def counting(name, cls):
        def __call__(self, *args, **kwargs):
            calls[name] += 1
            return cls.__call__(self, *args, **kwargs)
        return type(cls.__name__, (cls,), {"__call__": __call__})

    # swap each engine's class for a counting subclass: the engine object (and whoever holds it) stays the same
    for name, engine in (("ghost", trainer.ghost), ("per_sample", trainer.grad_sampler)):
        if engine is not None:
            engine.__class__ = counting(name, type(engine))
    return calls


def _assert_used(calls: dict, mode: str) -> None:
    other = "per_sample" if mode == "ghost" else "ghost"
    assert calls[mode] > 0 and calls[other] == 0, f"the step must be computed by {mode}, got calls {calls}"


def _clipped_sum_reference(net, loss_fn, x, y, clip):
    """sum_i g_i min(1, C / (||g_i|| + 1e-6)) by per-example autograd, and the per-example norms."""
    params = dict((n, p) for n, p in net.named_parameters() if p.requires_grad)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(x.shape[0]):
        net.zero_grad()
        loss_fn(net(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params.values()))
        norms.append(norm)
        for n, p in params.items():
            total[n] += p.grad * min(1.0, clip / (float(norm) + 1e-6))
    return total, torch.stack(norms)


def _trainer(net, data, batch_size=4, **kw):
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    loader = DataLoader(data, batch_size=batch_size)
    kw.setdefault("noise_multiplier", SIGMA)
    kw.setdefault("max_grad_norm", CLIP)
    kw.setdefault("noise_seed", SEED)
    kw.setdefault("grad_sample_mode", MODE.get("value", "auto"))
    return DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net, optimizer=opt,
                               loss_function=nn.CrossEntropyLoss(), **kw)


def _reference_update(net, x, y, groups, expected_batch_size, sigma=SIGMA, clip=CLIP, seed=SEED, lr=1.0):
    """DP-SGD written out: per-example autograd, sum rows of one item, clip, sum, add N(0, σC), divide by E[B]."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    per_row = []
    for i in range(x.shape[0]):
        net.zero_grad()
        loss_fn(net(x[i : i + 1]), y[i : i + 1]).backward()
        per_row.append([p.grad.detach().clone() for p in params])
    num_items = int(groups.max()) + 1
    per_item = [[torch.zeros_like(p) for p in params] for _ in range(num_items)]
    for r, g in enumerate(groups.tolist()):
        for j, gr in enumerate(per_row[r]):
            per_item[g][j] += gr
    total = [torch.zeros_like(p) for p in params]
    for item in per_item:
        norm = torch.sqrt(sum((g**2).sum() for g in item))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for j, g in enumerate(item):
            total[j] += factor * g
    gen = torch.Generator().manual_seed(seed)  # one flat draw over all parameters, split in their order
    sizes = [p.numel() for p in params]
    flat = torch.normal(0.0, sigma * clip, size=(sum(sizes),), generator=gen).split(sizes)
    new = []
    for p, t, z in zip(params, total, flat):
        noise = z.view_as(p)
        new.append(p.detach() - lr * (t + noise) / expected_batch_size)
    return new


def _batch(data, idx, groups=None):
    rows = [data[i] for i in idx]
    batch = {"image": torch.stack([r["image"] for r in rows]), "label": torch.stack([r["label"] for r in rows])}
    batch[GROUP_KEY] = torch.arange(len(idx)) if groups is None else torch.tensor(groups)
    return batch


def _run_one_iteration(trainer, batch):
    trainer.state.iteration = 1
    trainer.state.device = torch.device("cpu")
    return trainer._iteration(trainer, batch)


def test_update_equals_reference_dp_sgd(grad_sample_mode):
    data = make_classification_data(n=40)
    net = TinyClassifier()
    trainer = _trainer(net, data, batch_size=4)
    batch = _batch(data, [0, 3, 5, 8, 9, 11])
    expected = _reference_update(trainer.network, batch["image"], batch["label"], batch[GROUP_KEY], 4)
    calls = _spy_engines(trainer)
    _run_one_iteration(trainer, batch)
    _assert_used(calls, grad_sample_mode)
    for p, e in zip(trainer.network.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert trainer.dp_steps == 1


def test_rows_of_one_item_are_clipped_together(grad_sample_mode):
    """Four crops of one image move the update by at most C in total, not 4 C."""
    data = make_classification_data(n=40)
    net = TinyClassifier()
    trainer = _trainer(net, data, batch_size=4)
    groups = [0, 0, 0, 0, 1, 2, 2]
    batch = _batch(data, [0, 1, 2, 3, 4, 5, 6], groups)
    expected = _reference_update(trainer.network, batch["image"], batch["label"], torch.tensor(groups), 4)
    wrong = _reference_update(trainer.network, batch["image"], batch["label"], torch.arange(7), 4)
    calls = _spy_engines(trainer)
    _run_one_iteration(trainer, batch)
    _assert_used(calls, grad_sample_mode)
    for p, e in zip(trainer.network.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(e, w) for e, w in zip(expected, wrong)), "grouping must change the update"


def test_item_contribution_bounded_by_clip_norm(grad_sample_mode):
    """Adding one item (with 4 rows) to a batch changes the pre-noise sum by at most C."""
    data = make_classification_data(n=40)
    for g in (data[i] for i in range(4)):
        g["image"] = g["image"] * 100.0  # huge gradients
    base = _batch(data, [10, 11, 12])
    with_item = _batch(data, [10, 11, 12, 0, 1, 2, 3], [0, 1, 2, 3, 3, 3, 3])
    sums, item_norms = [], None
    for batch in (base, with_item):
        torch.manual_seed(0)
        net = TinyClassifier()
        trainer = _trainer(net, data)
        calls = _spy_engines(trainer)
        trainer.optimizer.zero_grad()
        x, y, groups = batch["image"], batch["label"], batch[GROUP_KEY]
        if grad_sample_mode == "ghost":
            summed, item_norms, _, _ = trainer.ghost(x, y, groups, int(groups.max()) + 1, CLIP)
            sums.append(torch.cat([summed[name].flatten() for name, _ in trainer.dp_network_params]))
        else:
            grads, _, _ = trainer.grad_sampler(x, y, groups, int(groups.max()) + 1)
            for name, p in trainer.dp_network_params:
                p.grad_sample = grads[name]
            trainer.optimizer.signal_skip_step(do_skip=True)
            trainer.optimizer.step()
            sums.append(torch.cat([p.summed_grad.flatten() for _, p in trainer.dp_network_params]))
            item_norms = torch.sqrt(sum((g.reshape(g.shape[0], -1) ** 2).sum(1) for g in grads.values()))
        _assert_used(calls, grad_sample_mode)
    assert float(item_norms[-1]) > 10 * CLIP, "the added item's raw gradient is far above C: clipping is what bounds it"
    assert float((sums[1] - sums[0]).norm()) <= CLIP * (1 + 1e-4)


def test_virtual_steps_equal_one_logical_step(grad_sample_mode):
    data = make_classification_data(n=40)
    batch = _batch(data, list(range(9)), [0, 0, 1, 2, 3, 4, 4, 4, 5])
    results = []
    for physical in (None, 2, 1):
        trainer = _trainer(TinyClassifier(), data, batch_size=4, max_physical_batch_size=physical)
        if physical is None:
            expected = _reference_update(trainer.network, batch["image"], batch["label"], batch[GROUP_KEY], 4)
        calls = _spy_engines(trainer)
        _run_one_iteration(trainer, batch)
        _assert_used(calls, grad_sample_mode)
        results.append([p.detach().clone() for p in trainer.network.parameters()])
        assert trainer.dp_steps == 1
    for a, e in zip(results[0], expected):  # the one logical step is the clipped DP-SGD step
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_accumulation_steps_map_onto_virtual_steps():
    data = make_classification_data(n=40)
    trainer = _trainer(TinyClassifier(), data, batch_size=4, accumulation_steps=3)
    assert trainer.privacy.sample_rate == pytest.approx(12 / 40)
    assert trainer.physical_batch_size == 4
    assert trainer.optimizer.expected_batch_size == 12
    assert trainer.accumulation_steps == 1


def test_empty_batch_takes_noise_only_step():
    data = make_classification_data(n=40)
    trainer = _trainer(TinyClassifier(), data, batch_size=4)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    _run_one_iteration(trainer, {EMPTY_BATCH_KEY: True})
    gen = torch.Generator().manual_seed(SEED)
    sizes = [p.numel() for p in trainer.network.parameters()]
    flat = torch.normal(0.0, SIGMA * CLIP, size=(sum(sizes),), generator=gen).split(sizes)
    for b, p, z in zip(before, trainer.network.parameters(), flat):
        noise = z.view_as(p)
        torch.testing.assert_close(p.detach(), b - noise / 4, rtol=1e-5, atol=1e-7)
    assert trainer.dp_steps == 1


def test_empty_batches_in_a_real_run_are_stepped_and_accounted(grad_sample_mode):
    # N = 60, batch 1: q = 1/60, each batch is empty with probability (59/60)^60 ≈ 0.36
    data = make_classification_data(n=60)
    trainer = _trainer(TinyClassifier(), data, batch_size=1, sampling_seed=0, noise_seed=None)
    calls = _spy_engines(trainer)
    seen = {"empty": 0}
    from ignite.engine import Events

    @trainer.on(Events.ITERATION_STARTED)
    def _count(engine):
        if EMPTY_BATCH_KEY in engine.state.batch:
            seen["empty"] += 1

    trainer.run()
    assert seen["empty"] > 0
    assert trainer.dp_steps == 60 == trainer.state.iteration
    _assert_used(calls, grad_sample_mode)  # the non-empty batches


def test_loss_is_per_sample_even_for_batch_reducing_losses(grad_sample_mode):
    """DiceCELoss reduces over the batch; the trainer evaluates it per example so each example is clipped."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 2, (4, 8), (2,), norm="instance")
    x = torch.randn(3, 1, 16, 16)
    y = torch.randint(0, 2, (3, 1, 16, 16))
    data = [{"image": x[i], "label": y[i]} for i in range(3)] * 4
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=3),
                                  network=net, optimizer=opt, loss_function=loss, noise_multiplier=1.0,
                                  max_grad_norm=1e-3, grad_sample_mode=grad_sample_mode)
    calls = _spy_engines(trainer)
    if grad_sample_mode == "ghost":  # no per-example gradients to compare: the clipped sum and the norms instead
        summed, norms, losses, _ = trainer.ghost(x, y, None, None, 1e-3)
        expected, expected_norms = _clipped_sum_reference(trainer.network, loss, x, y, 1e-3)
        assert (expected_norms > 1e-3).all(), "every example is clipped here"
        torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7)
        for name, e in expected.items():
            torch.testing.assert_close(summed[name], e, rtol=1e-4, atol=1e-8)
    else:
        grads, losses, _ = trainer.grad_sampler(x, y)
        for i in range(3):
            net.zero_grad()
            loss(net(x[i : i + 1]), y[i : i + 1]).backward()
            for name, p in net.named_parameters():
                torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)
    assert losses.shape == (3,)
    _assert_used(calls, grad_sample_mode)


def test_dice_ce_pre_noise_sum_is_bounded_by_items_times_clip(grad_sample_mode):
    """The failure measured with Opacus ghost mode (scalar DiceCELoss, norm 278.8 against a bound of 2) cannot occur."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 2, (8, 16), (2,), norm="batch")
    x = torch.randn(2, 1, 16, 16) * 50
    y = torch.randint(0, 2, (2, 1, 16, 16))
    data = [{"image": x[i], "label": y[i]} for i in range(2)] * 4
    trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=2),
                                  network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                  loss_function=DiceCELoss(to_onehot_y=True, softmax=True), noise_multiplier=1.0,
                                  max_grad_norm=0.1, target_delta=1e-2, grad_sample_mode=grad_sample_mode)
    calls = _spy_engines(trainer)
    if grad_sample_mode == "ghost":
        summed, norms, _, _ = trainer.ghost(x, y, None, None, 0.1)
        total = torch.sqrt(sum((g**2).sum() for g in summed.values()))
    else:
        grads, _, _ = trainer.grad_sampler(x, y)
        norms = torch.sqrt(sum((g.reshape(2, -1) ** 2).sum(1) for g in grads.values()))
        for name, p in trainer.dp_network_params:
            p.grad_sample = grads[name]
        trainer.optimizer.signal_skip_step(do_skip=True)
        trainer.optimizer.step()
        total = torch.sqrt(sum((p.summed_grad**2).sum() for _, p in trainer.dp_network_params))
    _assert_used(calls, grad_sample_mode)
    assert (norms > 0.5).all(), "raw per-sample norms exceed C, so clipping matters here"
    assert float(total) <= 2 * 0.1 * (1 + 1e-5)


def test_an_interrupted_step_leaves_nothing_behind(grad_sample_mode):
    """Clipped sums of a step that failed half-way must not leak into the next step's update."""
    data = make_classification_data(n=40)
    batch = _batch(data, list(range(6)))
    trainer = _trainer(TinyClassifier(), data, batch_size=4, max_physical_batch_size=2)
    calls = {"n": 0}
    engine = trainer.ghost if trainer.ghost is not None else trainer.grad_sampler  # whichever computes the sums
    assert (engine is trainer.ghost) == (grad_sample_mode == "ghost")
    real_cls = type(engine)

    def failing_second_chunk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real_cls.__call__(self, *args, **kwargs)

    engine.__class__ = type(real_cls.__name__, (real_cls,), {"__call__": failing_second_chunk})
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run_one_iteration(trainer, batch)
    assert calls["n"] == 2
    assert trainer.dp_steps == 1  # the sampling happened: a failed step is accounted, nothing of it applied
    engine.__class__ = real_cls
    fresh = _trainer(TinyClassifier(), data, batch_size=4, max_physical_batch_size=2)
    _run_one_iteration(trainer, batch)
    _run_one_iteration(fresh, batch)
    for a, b in zip(trainer.network.parameters(), fresh.network.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("empty", [False, True])
def test_trainer_dp_optimizer_equals_opacus(empty):
    """The trainer's DP optimizer (linear-time scale and empty-batch accumulate) updates exactly as Opacus'."""
    from opacus.optimizers import DPOptimizer

    from monai_dp.engines.optimizer import PrivateNoiseDPOptimizer

    results = []
    for cls in (DPOptimizer, PrivateNoiseDPOptimizer):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
        opt = cls(torch.optim.SGD(params, lr=0.5), noise_multiplier=0.7, max_grad_norm=1.0, expected_batch_size=6,
                  generator=torch.Generator().manual_seed(1))
        opt.flat_noise = False  # Opacus' per-tensor noise stream (the flat draw: tests/engines/test_flat_noise.py)
        for p in params:
            rows = 0 if empty else 6
            p.grad_sample = torch.randn(rows, *p.shape, generator=torch.Generator().manual_seed(p.numel()))
            if empty:
                p.summed_grad = torch.full_like(p, 0.3)
        opt.step()
        results.append([p.detach().clone() for p in params])
        opt.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)
