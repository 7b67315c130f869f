"""Ghost clipping gives the same clipped sum and per-item norms as clipping materialised per-item gradients."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets
from torch import nn

from monai_dp.networks import PerSampleGradients, make_private_compatible
from monai_dp.networks.ghost import GhostClipping, unfold_nd
from monai_dp.utils.errors import DPIncompatibleModuleError

GROUPS = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 come from one item


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(2), nn.Linear(16, 8), nn.LayerNorm(8), nn.PReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # (R, 1, 4, 4) -> tokens (R, 1, 16) -> Linear on rank-3 inputs -> pool
        return self.head(self.body(x).mean(1))


class _Convs(nn.Module):
    """Every supported convolution configuration: stride, padding ('same' too), dilation, groups, depthwise, 1D/3D."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, padding_mode="reflect")
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.act = nn.PReLU(4)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c1d = nn.Conv1d(4, 3, 2, stride=2, dilation=1)
        self.c3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.up3d = nn.ConvTranspose3d(2, 2, 2, stride=2)
        self.inorm = nn.InstanceNorm3d(2, affine=True)
        self.fc = nn.Linear(3 + 2, 2)

    def forward(self, x):
        h = self.act(self.gn(self.dw(self.c2(self.c1(x)))))
        h = self.up(h)  # (R, 4, 8, 8)
        h1 = self.c1d(h.flatten(2)).mean(2)
        h3 = self.inorm(self.up3d(self.c3d(x.unsqueeze(2)))).mean((2, 3, 4))
        h1 = h1 + self.c1d(h.flatten(2)).mean(2)  # a layer called twice: its positions are concatenated
        return self.fc(torch.cat([h1, h3], 1))


def _net(name):
    if name == "DenseNet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4), 2, 32
    if name == "ResNet18":
        return nets.ResNet("basic", [2, 2, 2, 2], [8, 8, 16, 16], spatial_dims=2, n_input_channels=1,
                           num_classes=2), 2, 32
    if name == "UNet-2d":
        return nets.UNet(2, 1, 2, (4, 8, 16), (2, 2), num_res_units=1), 2, 16
    if name == "UNet-3d":
        return nets.UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1), 3, 16
    if name == "BasicUNet-2d":
        return nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)), 2, 32
    if name == "SegResNet-3d":
        return nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1),
                              blocks_up=(1, 1)), 3, 16
    if name == "DynUNet-3d":
        return nets.DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], norm_name="batch"), 3, 16
    if name == "MLP":
        return _MLP(), 2, 4
    if name == "Convs":
        return _Convs(), 2, 8
    raise KeyError(name)


OWN = (_MLP, _Convs)  # the test's own modules: their forward keeps rows independent (declared, then probed)
SEG = {"UNet-2d", "UNet-3d", "BasicUNet-2d", "SegResNet-3d", "DynUNet-3d"}
NETS = ["DenseNet121", "ResNet18", "UNet-2d", "UNet-3d", "BasicUNet-2d", "SegResNet-3d", "DynUNet-3d", "MLP", "Convs"]


def _setup(name):
    torch.manual_seed(0)
    net, d, size = _net(name)
    net = make_private_compatible(net)[0].double().train()
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    x = torch.randn(4, 1, *(size,) * d, dtype=torch.float64)
    if name in SEG:
        from monai.losses import DiceCELoss

        loss, y = DiceCELoss(to_onehot_y=True, softmax=True), torch.randint(0, 2, (4, 1, *(size,) * d))
    else:
        loss, y = nn.CrossEntropyLoss(), torch.tensor([0, 1, 1, 0])
    return net, loss, x, y


def _reference(net, loss, x, y, c):
    grads, losses, _ = PerSampleGradients(net, loss, method="expanded")(x, y, GROUPS, 3)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    norms = torch.cat([grads[n].flatten(1) for n in names], 1).norm(dim=1)
    w = (c / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", w, grads[n]) for n in names}, norms, losses


# mixed on every network; each path forced alone on the small ones (mixed picks both on Convs and DenseNet121)
CASES = [(n, "mixed") for n in NETS] + [(n, m) for n in ("Convs", "MLP", "UNet-2d") for m in ("ghost", "materialise")]


@pytest.mark.parametrize("name, norm_method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_clipped_sum_equals_clipped_per_item_gradients(name, norm_method):
    net, loss, x, y = _setup(name)
    ref_norms = _reference(net, loss, x, y, 1.0)[1]
    c = float(ref_norms.median())  # one item clipped, one not, one at the bound
    ref_sum, ref_norms, ref_losses = _reference(net, loss, x, y, c)
    gc = GhostClipping(net, loss, norm_method=norm_method, row_independent=OWN)
    for call in ("first (checks coverage)", "later (backward to the input only)"):
        summed, norms, losses, preds = gc(x, y, GROUPS, 3, c)
        assert preds.shape[0] == 4 and losses.shape == (4,)
        torch.testing.assert_close(losses, ref_losses)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-8, atol=1e-12)
        for n, ref in ref_sum.items():
            torch.testing.assert_close(summed[n], ref, rtol=1e-6, atol=1e-10,
                                       msg=lambda m, n=n, call=call: f"{name} {n} ({call} call): {m}")
    assert gc._reached
    if norm_method != "mixed":
        assert set(gc.last_choice.values()) == {norm_method}
    elif name in ("Convs", "DenseNet121"):
        assert set(gc.last_choice.values()) == {"ghost", "materialise"}


def test_one_item_per_row_and_clipping_bounds_the_sum():
    net, loss, x, y = _setup("Convs")
    summed, norms, _, _ = GhostClipping(net, loss, row_independent=OWN)(x, y, None, None, 1e-3)
    assert norms.shape == (4,) and bool((norms > 1e-3).all())
    total = torch.cat([t.flatten() for t in summed.values()]).norm()
    assert float(total) <= 4 * 1e-3 * (1 + 1e-9)  # each item contributes at most C


@pytest.mark.parametrize("d", [1, 2, 3])
def test_unfold_matches_convolution(d):
    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{d}d")(3, 4, 3, stride=2, padding=1, dilation=2, bias=False).double()
    x = torch.randn(2, 3, *(9,) * d, dtype=torch.float64)
    cols = unfold_nd(x, conv.kernel_size, conv.stride, [(1, 1)] * d, conv.dilation)
    out = (cols @ conv.weight.flatten(1).T).transpose(1, 2)
    torch.testing.assert_close(out, conv(x).flatten(2))


def test_unsupported_layer_is_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Identity(), nn.BatchNorm2d(2)), nn.Flatten(),
                        nn.Embedding(3, 2))
    with pytest.raises(DPIncompatibleModuleError, match=r"`1\.1`: BatchNorm2d holds trainable parameters") as e:
        GhostClipping(net, nn.CrossEntropyLoss())
    assert "`3`: Embedding" in str(e.value) and "PerSampleGradients" in str(e.value)


def test_tied_parameters_and_frozen_parameters():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight
    with pytest.raises(DPIncompatibleModuleError, match=r"`1\.weight`: the parameter is shared with `0\.weight`"):
        GhostClipping(nn.Sequential(a, b), nn.CrossEntropyLoss())
    frozen = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).requires_grad_(False), nn.Linear(2, 2))
    summed, _, _, _ = GhostClipping(frozen.eval(), nn.CrossEntropyLoss())(torch.randn(3, 2), torch.tensor([0, 1, 1]),
                                                                           None, None, 1.0)
    assert set(summed) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_argument_errors():
    gc = GhostClipping(nn.Linear(2, 2), nn.CrossEntropyLoss())
    x, y = torch.randn(2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"`max_grad_norm` must be a finite number > 0, got 0"):
        gc(x, y, None, None, 0)
    with pytest.raises(ValueError, match=r"`groups` must be a tensor of shape \(2,\)"):
        gc(x, y, torch.tensor([0]), 1, 1.0)
    with pytest.raises(ValueError, match=r"`norm_method` must be"):
        GhostClipping(nn.Linear(2, 2), nn.CrossEntropyLoss(), norm_method="fast")


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def forward(self, x):  # uses the layer's weight without calling the layer (like MultiheadAttention.out_proj)
        return nn.functional.linear(x, self.inner.weight)


def test_parameter_used_outside_its_layer_is_refused():
    with pytest.raises(DPIncompatibleModuleError, match=r"`inner`: its parameters are used outside its forward"):
        GhostClipping(_Functional(), nn.CrossEntropyLoss(), row_independent=(_Functional,))(
            torch.randn(2, 2), torch.tensor([0, 1]), None, None, 1.0)


class _InputFree(nn.Module):
    """A layer whose output does not depend on the input: a backward to the input alone would miss it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.const = nn.Linear(1, 2)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.const(torch.ones(x.shape[0], 1, dtype=x.dtype))


def test_layer_off_the_input_path_keeps_its_gradient_on_later_calls():
    torch.manual_seed(0)
    net = _InputFree().double()
    loss, x, y = nn.CrossEntropyLoss(), torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    ref_sum, ref_norms, _ = _reference(net, loss, x, y, 0.5)
    gc = GhostClipping(net, loss, row_independent=(_InputFree,))
    for _ in range(3):
        summed, norms, _, _ = gc(x, y, GROUPS, 3, 0.5)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-8, atol=1e-12)
        for n, ref in ref_sum.items():
            torch.testing.assert_close(summed[n], ref, rtol=1e-6, atol=1e-10)
    assert not gc._input_only
