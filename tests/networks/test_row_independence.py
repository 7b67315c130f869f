"""Ghost clipping only where every module keeps the rows of a batch independent; per-sample gradients stay within C.

A module that mixes rows (``x - x.mean(0)``) between two Linear layers made the clipped sum computed by ghost
clipping move by many times C when one item was added. Ghost clipping must refuse such a network (allow-list
at construction, probe on the first batch); per-sample gradients compute every row alone and stay within C.
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks import nets
from torch import nn

from monai_dp.networks import (
    GhostClipping,
    PerSampleGradients,
    find_row_mixing_modules,
    make_private_compatible,
    probe_row_independence,
    register_row_independent,
)
from monai_dp.networks import row_independence
from monai_dp.utils.errors import DPIncompatibleModuleError


class _CentreRows(nn.Module):
    """Subtracts the batch mean: every row's output depends on every other row."""

    def forward(self, x):
        return x - x.mean(0)


def _mixing_mlp():
    return nn.Sequential(nn.Linear(10, 16), _CentreRows(), nn.Tanh(), nn.Linear(16, 3)).double()


def _data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _neighbours(batch):
    """``(x, y)`` of ``batch + 1`` items: the first ``batch`` alike, the added one an outlier with a large gradient."""
    x, y = _data(batch + 1)
    x[-1] *= 100
    return x, torch.where(torch.arange(batch + 1) < batch, 0, 2)


def _clipped_sum(grads: dict, c: float) -> torch.Tensor:
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    w = (c / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (w[:, None] * flat).sum(0)


@pytest.mark.parametrize("batch", [16, 64])
def test_ghost_refuses_a_row_mixing_layer_at_construction_and_on_the_first_call(batch):
    torch.manual_seed(0)
    net, loss, c = _mixing_mlp(), nn.CrossEntropyLoss(), 1e-3
    x, y = _neighbours(batch)
    with pytest.raises(DPIncompatibleModuleError, match=r"`1`: _CentreRows is not known to keep the rows of a batch "
                                                        r"independent.*Fix: use per-sample gradients"):
        GhostClipping(net, loss)
    # declared row-wise by mistake: the probe on the first batch refuses it before any sum is returned
    with pytest.raises(DPIncompatibleModuleError, match=r"`1`: _CentreRows mixes the rows of a batch"):
        GhostClipping(net, loss, row_independent=(_CentreRows,))(x[:batch], y[:batch], None, None, c)
    # why: forced past both checks, adding the one item moves the clipped sum by many times C
    forced = GhostClipping(net, loss, row_independent=(_CentreRows,), probe_rows=0)
    sums = [torch.cat([g.flatten() for g in forced(x[:n], y[:n], None, None, c)[0].values()])
            for n in (batch, batch + 1)]
    assert float((sums[1] - sums[0]).norm()) > 10 * c


@pytest.mark.parametrize("method", ["vmap_grad", "expanded"])
@pytest.mark.parametrize("batch", [16, 64])
def test_per_sample_clipped_sum_moves_by_at_most_c_with_a_row_mixing_layer(batch, method):
    """Every row runs alone (a batch of one under vmap) on both paths, so the mixing layer sees one row."""
    torch.manual_seed(0)
    net, loss, c = _mixing_mlp(), nn.CrossEntropyLoss(), 1e-3  # every item clipped: the worst case
    x, y = _neighbours(batch)
    sums = []
    for n in (batch, batch + 1):  # neighbouring batches: the second has one more item
        sampler = PerSampleGradients(net, loss, method=method)
        grads, _, _ = sampler(x[:n], y[:n])
        assert sampler.method == method
        sums.append(_clipped_sum(grads, c))
    moved = float((sums[1] - sums[0]).norm())
    assert moved > 0.5 * c  # the added item is there (it is clipped to norm c)
    assert moved <= c * (1 + 1e-9)


def _small(name):
    if name == "EfficientNetBN":
        return nets.EfficientNetBN("efficientnet-b0", spatial_dims=2, in_channels=1, num_classes=2, pretrained=False)
    if name == "SEResNet":
        return nets.SENet(2, 1, "se_resnet_bottleneck", [1, 1, 1, 1], groups=1, reduction=4, inplanes=16,
                          downsample_kernel_size=1, input_3x3=False, num_classes=2, dropout_prob=0.5)
    return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                            dropout_prob=0.5)


@pytest.mark.parametrize("name", ["DenseNet121", "EfficientNetBN", "SEResNet"])
def test_allowed_networks_pass_the_allow_list_and_the_probe_with_dropout_on(name):
    """(DenseNet121, ResNet, UNet, BasicUNet, SegResNet, DynUNet also run end to end in test_ghost.py.)"""
    torch.manual_seed(0)
    net = make_private_compatible(_small(name))[0].train()
    gc = GhostClipping(net, nn.CrossEntropyLoss())
    x = torch.randn(4, 1, 32, 32)
    rng = torch.get_rng_state()
    gc.check_row_independence(x)  # dropout and drop-connect draw masks: same random state in every probe pass
    assert gc._probed
    assert torch.equal(rng, torch.get_rng_state())  # the probe does not consume the training random state


class _Declared(nn.Module):
    """Looks like a plain container of allowed layers, but its forward centres the rows inline."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 8), nn.Linear(8, 3)
        nn.init.zeros_(self.b.weight)  # the output does not show the mixing at these weights; the gradient would

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0))


def test_probe_finds_inline_mixing_in_a_declared_container_even_when_the_output_hides_it():
    net = nn.Sequential(nn.Identity(), _Declared()).double()
    x, y = _data(8)
    gc = GhostClipping(net, nn.CrossEntropyLoss(), row_independent=(_Declared,))
    with pytest.raises(DPIncompatibleModuleError, match=r"`1`: _Declared mixes the rows of a batch: on 4 rows of "
                                                        r"the first batch, changing the other rows changed one "
                                                        r"row's input to `1\.b`"):
        gc(x, y, None, None, 1.0)


def test_probe_finds_a_patched_function_behind_an_allowed_layer(monkeypatch):
    net = nn.Sequential(nn.Linear(10, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x, y = _data(8)
    gc = GhostClipping(net, nn.CrossEntropyLoss())
    gelu = nn.functional.gelu
    monkeypatch.setattr(nn.functional, "gelu",
                        lambda t, approximate="none": gelu(t - t.mean(0), approximate=approximate))
    with pytest.raises(DPIncompatibleModuleError, match=r"`1`: GELU mixes the rows of a batch"):
        gc(x, y, None, None, 1.0)
    monkeypatch.undo()
    gc(x, y, None, None, 1.0)  # the same network, unpatched, passes
    assert gc._probed


def test_probe_leaves_buffers_and_modes_and_finds_nothing_in_row_wise_networks():
    net = nn.Sequential(nn.Conv1d(2, 8, 3), nn.InstanceNorm1d(8, affine=True, track_running_stats=True),
                        nn.Dropout(0.5), nn.Flatten(), nn.Linear(24, 3)).train()
    before = net[1].running_mean.clone()
    assert probe_row_independence(net, torch.randn(6, 2, 5)) == []
    assert torch.equal(before, net[1].running_mean) and net.training
    assert probe_row_independence(nn.Sequential(nn.Linear(10, 3), _CentreRows()), torch.randn(1, 10)) == []  # 1 row
    assert probe_row_independence(nn.Sequential(nn.Linear(10, 3), _CentreRows()), torch.randn(3, 10))[0][0] == "1"


def test_train_mode_batchnorm_is_refused_on_the_call_after_eval_was_accepted():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).requires_grad_(False), nn.Linear(4, 2)).eval()
    gc = GhostClipping(net, nn.CrossEntropyLoss())
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    gc(x, y, None, None, 1.0)
    net.train()
    with pytest.raises(DPIncompatibleModuleError, match=r"`1`: BatchNorm1d in train mode normalises with batch "
                                                        r"statistics"):
        gc(x, y, None, None, 1.0)


@pytest.mark.parametrize("layer, ok", [(nn.Softmax(dim=1), True), (nn.Softmax(dim=0), False),
                                       (nn.Softmax(dim=-1), False), (nn.Flatten(), True), (nn.Flatten(0), False),
                                       (nn.Unflatten(1, (2, 2)), True), (nn.Unflatten(0, (2, 2)), False)])
def test_dimension_dependent_layers(layer, ok):
    offenders = find_row_mixing_modules(nn.Sequential(nn.Linear(4, 4), layer))
    assert offenders == [] if ok else offenders[0][0] == "1" and "dimension 0" in offenders[0][1]


class _Linear(nn.Linear):  # overrides nothing: the checked forward is Linear's
    pass


class _LinearOwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x - x.mean(0))


def test_what_the_allow_list_refuses():
    net = nn.Sequential(_Linear(4, 4), _LinearOwnForward(4, 4), nn.Identity(), nn.ReLU(), nn.Sequential())
    net[2].forward = lambda x: x - x.mean(0)
    net[3].register_forward_hook(lambda m, a, o: o - o.mean(0))
    got = {path: problem for path, problem, _ in find_row_mixing_modules(net, inferer=lambda x, n: n(x))}
    assert set(got) == {"1", "2", "3", "<inferer>"}
    assert "_LinearOwnForward is not known" in got["1"] and "forward() set on the instance" in got["2"]
    assert "hooks" in got["3"] and "function is not known" in got["<inferer>"]
    assert find_row_mixing_modules(nn.Linear(2, 2), inferer=SimpleInferer()) == []
    assert find_row_mixing_modules(nn.Linear(2, 2), inferer=SlidingWindowInferer((4, 4)))[0][0] == "<inferer>"


def test_inferer_set_after_construction_is_checked_on_the_call():
    gc = GhostClipping(nn.Linear(4, 2), nn.CrossEntropyLoss())
    gc.inferer = lambda x, n: n(x - x.mean(0))
    with pytest.raises(DPIncompatibleModuleError, match=r"`<inferer>`: function is not known"):
        gc(torch.randn(3, 4), torch.tensor([0, 1, 0]), None, None, 1.0)


def test_register_row_independent(monkeypatch):
    monkeypatch.setattr(row_independence, "_DECLARED", {})

    @register_row_independent
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    class Sub(Scale):
        def forward(self, x):
            return x - x.mean(0)

    assert find_row_mixing_modules(nn.Sequential(nn.Linear(2, 2), Scale())) == []
    assert find_row_mixing_modules(nn.Sequential(Sub()))[0][0] == "0"
    with pytest.raises(TypeError, match=r"`cls` must be a class \(the module's class, not an instance\), got 'Linear'"):
        register_row_independent(nn.Linear(2, 2))


def test_probe_rows_argument():
    with pytest.raises(ValueError, match=r"`probe_rows` must be 0 \(no probe\) or an integer >= 2, got 1"):
        GhostClipping(nn.Linear(2, 2), nn.CrossEntropyLoss(), probe_rows=1)
    gc = GhostClipping(_mixing_mlp(), nn.CrossEntropyLoss(), row_independent=(_CentreRows,), probe_rows=0)
    assert gc._probed  # the allow-list, as declared, is then all there is


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x):  # assumes a batch of 8: the probe's 4 rows fail
        return self.fc(x.reshape(8, 10))


def test_a_network_the_probe_cannot_run_is_refused_not_crashed():
    x, y = _data(8)
    gc = GhostClipping(_FixedBatch().double(), nn.CrossEntropyLoss(), row_independent=(_FixedBatch,))
    with pytest.raises(DPIncompatibleModuleError, match=r"`<root>`: the row-independence probe could not run the "
                                                        r"network on 4 rows of the first batch \(RuntimeError"):
        gc(x, y, None, None, 1.0)
