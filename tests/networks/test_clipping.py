"""One clipping contract for both engines, and the auto clipper that decides once and owns the fallback."""

from __future__ import annotations

import logging
from itertools import count

import pytest
import torch
from monai.inferers import SimpleInferer
from opacus.optimizers import DPOptimizer
from torch import nn

from monai_dp.networks import (
    AutoClipper,
    ClippedSum,
    GhostClipping,
    PerSampleGradients,
    clipping,
    make_clipper,
    trainable_parameters,
)
from monai_dp.utils.errors import DPIncompatibleModuleError
from tests.networks.test_ghost import GROUPS, OWN, _setup


class _CentreRows(nn.Module):
    """Subtracts the batch mean: every row depends on every other row (the probe finds it)."""

    def forward(self, x):
        return x - x.mean(0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _data(rows=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 10, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (rows,), generator=gen)


def _engines(net, loss):
    return {"ghost": GhostClipping(net, loss, row_independent=OWN), "per_sample": PerSampleGradients(net, loss),
            "auto": make_clipper(net, loss, mode="auto", row_independent=OWN)}


def _median_norm(net, loss, x, y):
    return float(PerSampleGradients(net, loss).clipped_sum(x, y, GROUPS, 3, 1.0).norms.median())


@pytest.mark.parametrize("engine", ["ghost", "per_sample", "auto"])
def test_every_engine_satisfies_the_contract(engine):
    net, loss, x, y = _setup("Convs")
    net = net.float()
    x = x.float()
    out = _engines(net, loss)[engine].clipped_sum(x, y, GROUPS, 3, 0.5)
    assert isinstance(out, ClippedSum)
    params = trainable_parameters(net)
    assert list(out.summed) == list(params)
    for n, p in params.items():
        assert out.summed[n].shape == p.shape and out.summed[n].dtype == p.dtype, n
        assert not out.summed[n].requires_grad
    assert out.norms.shape == (3,) and out.norms.dtype == torch.float32
    assert out.losses.shape == (4,) and out.preds.shape[0] == 4
    total = torch.cat([g.flatten() for g in out.summed.values()]).double().norm()
    assert float(total) <= 3 * 0.5 * (1 + 1e-5)  # three items, each at most C


@pytest.mark.parametrize("name", ["MLP", "Convs", "UNet-2d", "ResNet18"])
def test_both_engines_give_the_same_clipped_sum_to_float64_precision(name):
    net, loss, x, y = _setup(name)
    c = _median_norm(net, loss, x, y)  # one item clipped, one not, one at the bound
    ghost = GhostClipping(net, loss, row_independent=OWN).clipped_sum(x, y, GROUPS, 3, c)
    per_sample = PerSampleGradients(net, loss).clipped_sum(x, y, GROUPS, 3, c)
    torch.testing.assert_close(ghost.norms, per_sample.norms, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ghost.losses, per_sample.losses)
    assert set(ghost.summed) == set(per_sample.summed)
    for n, ref in per_sample.summed.items():
        torch.testing.assert_close(ghost.summed[n], ref, rtol=1e-6, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


def test_per_sample_clipped_sum_is_bit_identical_to_opacus_clip_and_accumulate():
    """Moving the clipping out of the optimizer changes no bit of the sum: same formula, same operations."""
    net, loss, x, y = _setup("MLP")
    net = net.float()
    x = x.float()
    sampler = PerSampleGradients(net, loss)
    c = _median_norm(net, loss, x, y)
    grads = sampler(x, y, GROUPS, 3)[0]
    out = sampler.clipped_sum(x, y, GROUPS, 3, c)
    params = trainable_parameters(net)
    opt = DPOptimizer(torch.optim.SGD(params.values(), lr=0.1), noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=3)
    for n, p in params.items():
        p.grad_sample = grads[n]
    opt.clip_and_accumulate()
    for n, p in params.items():
        assert torch.equal(out.summed[n], p.summed_grad), n
    assert bool((out.norms > c).any()) and bool((out.norms < c).any())


def test_auto_times_both_on_the_first_call_and_never_again(monkeypatch):
    net, loss, x, y = _setup("MLP")
    clipper = make_clipper(net, loss, mode="auto", row_independent=OWN)
    assert clipper.ghost is not None and not clipper.decided and clipper.timings is None
    ticks = count()
    monkeypatch.setattr(clipping.time, "perf_counter", lambda: float(next(ticks)))
    checks = []
    real_check = clipping.cross_check
    monkeypatch.setattr(clipping, "cross_check", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    first = clipper.clipped_sum(x, y, GROUPS, 3, 1.0)
    assert clipper.decided and set(clipper.timings) == {"ghost", "per_sample"} and checks == [1]
    used, timings = next(ticks), dict(clipper.timings)
    second = clipper.clipped_sum(x, y, GROUPS, 3, 1.0)
    assert next(ticks) == used + 1  # nothing was timed on the second call
    assert checks == [1] and clipper.timings == timings
    for n, g in first.summed.items():
        torch.testing.assert_close(second.summed[n], g)


@pytest.mark.parametrize("faster", ["ghost", "per_sample"])
def test_auto_keeps_the_faster_engine_and_logs_it(monkeypatch, caplog, faster):
    net, loss, x, y = _setup("MLP")
    clipper = AutoClipper(net, loss, mode="auto", row_independent=OWN)
    # perf_counter is read at start and end of each engine's run: ghost first, then per-sample gradients
    clock = iter([0.0, 1.0, 1.0, 3.0] if faster == "ghost" else [0.0, 2.0, 2.0, 3.0])
    monkeypatch.setattr(clipping.time, "perf_counter", lambda: next(clock))
    spy = {"ghost": 0, "per_sample": 0}
    for name, engine in (("ghost", clipper.ghost), ("per_sample", clipper.per_sample)):
        real = engine.clipped_sum

        def counted(*a, name=name, real=real, **k):
            spy[name] += 1
            return real(*a, **k)

        monkeypatch.setattr(engine, "clipped_sum", counted)
    with caplog.at_level(logging.INFO, logger="monai_dp.networks.clipping"):
        clipper.clipped_sum(x, y, GROUPS, 3, 1.0)
    assert clipper.name == faster and (clipper.ghost is None) == (faster == "per_sample")
    word = "ghost clipping" if faster == "ghost" else "per-sample gradients"
    assert f"grad_sample_mode='auto': {word} (first batch: ghost clipping" in caplog.text
    # timed once each, cross-checked once each, then the batch computed once by the chosen engine
    assert spy == ({"ghost": 3, "per_sample": 2} if faster == "ghost" else {"ghost": 2, "per_sample": 3})


def test_auto_falls_back_to_per_sample_where_ghost_clipping_refuses_the_network(caplog):
    # refused at construction: a trainable BatchNorm
    net = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with caplog.at_level(logging.INFO, logger="monai_dp.networks.clipping"):
        clipper = make_clipper(net, nn.CrossEntropyLoss(), mode="auto")
    assert clipper.ghost is None and clipper.decided and clipper.name == "per_sample"
    assert "Per-sample gradients (ghost clipping does not support: " in caplog.text
    with pytest.raises(DPIncompatibleModuleError, match=r"`1`: BatchNorm1d holds trainable parameters"):
        make_clipper(net, nn.CrossEntropyLoss(), mode="ghost")
    # refused on the first call: declared row-independent, but the probe finds the rows mixed
    torch.manual_seed(0)
    mixing = nn.Sequential(nn.Linear(10, 16), _CentreRows(), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = _data()
    clipper = make_clipper(mixing, nn.CrossEntropyLoss(), mode="auto", row_independent=(_CentreRows,))
    assert clipper.ghost is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_dp.networks.clipping"):
        out = clipper.clipped_sum(x, y, None, None, 0.1)
    assert clipper.ghost is None and clipper.decided and clipper.timings is None
    assert "Ghost clipping cannot handle this network (" in caplog.text
    ref = PerSampleGradients(mixing, nn.CrossEntropyLoss()).clipped_sum(x, y, None, None, 0.1)
    for n, g in ref.summed.items():
        assert torch.equal(out.summed[n], g), n
    forced = make_clipper(mixing, nn.CrossEntropyLoss(), mode="ghost", row_independent=(_CentreRows,))
    with pytest.raises(DPIncompatibleModuleError, match=r"mix"):
        forced.clipped_sum(x, y, None, None, 0.1)
    assert forced.ghost is not None


def test_auto_raises_when_the_two_clipped_sums_disagree():
    net = _mlp()
    x, y = _data()
    clipper = make_clipper(net, nn.CrossEntropyLoss(), mode="auto")
    real = clipper.ghost

    class Doubled(GhostClipping):  # e.g. a bug that drops the clip factor of half the items
        def __init__(self):
            self.__dict__.update(real.__dict__)

        def clipped_sum(self, *args, **kwargs):
            out = super().clipped_sum(*args, **kwargs)
            return out._replace(summed={n: 2 * g for n, g in out.summed.items()})

    clipper.ghost = Doubled()
    with pytest.raises(RuntimeError, match=r"`clipped sum of `.*`` must be the same by ghost clipping and by "
                                           r"per-sample gradients, got 'a difference of"):
        clipper.clipped_sum(x, y, None, None, 0.1)
    assert not clipper.decided


def test_per_sample_and_ghost_modes_never_time_and_inferer_reaches_both_engines():
    net = _mlp()
    x, y = _data()
    inferer = SimpleInferer()
    for mode in ("per_sample", "ghost"):
        clipper = make_clipper(net, nn.CrossEntropyLoss(), mode=mode)
        assert clipper.decided and clipper.name == mode
        clipper.inferer = inferer
        assert clipper.per_sample.inferer is inferer
        assert clipper.ghost is None or clipper.ghost.inferer is inferer
        clipper.clipped_sum(x, y, None, None, 1.0)
        assert clipper.timings is None
    with pytest.raises(ValueError, match=r"`grad_sample_mode` must be one of"):
        make_clipper(net, nn.CrossEntropyLoss(), mode="hooks")
    with pytest.raises(ValueError, match=r"`max_grad_norm` must be a finite number > 0, got 0"):
        make_clipper(net, nn.CrossEntropyLoss(), mode="per_sample").clipped_sum(x, y, None, None, 0)
