"""For every supported MONAI network, 2D and 3D, the per-sample gradients the trainer clips equal per-example autograd."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets
from torch import nn

from monai_dp.networks import PerSampleGradients, make_private_compatible


def _cls(name, d):
    if name == "DenseNet121":
        return nets.DenseNet121(spatial_dims=d, in_channels=1, out_channels=2, init_features=8, growth_rate=4)
    if name == "ResNet18":  # resnet18 blocks and norm, narrow widths to keep the test fast
        return nets.ResNet("basic", [2, 2, 2, 2], [8, 8, 16, 16], spatial_dims=d, n_input_channels=1, num_classes=2)
    if name == "EfficientNetBN":
        return nets.EfficientNetBN("efficientnet-b0", spatial_dims=d, in_channels=1, num_classes=2, pretrained=False)
    if name == "SEResNet":
        return nets.SENet(d, 1, "se_resnet_bottleneck", [1, 1, 1, 1], groups=1, reduction=4, inplanes=16,
                          downsample_kernel_size=1, input_3x3=False, num_classes=2, dropout_prob=None)
    raise KeyError(name)


def _seg(name, d):
    if name == "UNet":
        return nets.UNet(d, 1, 2, (4, 8, 16), (2, 2), num_res_units=1)
    if name == "BasicUNet":
        return nets.BasicUNet(d, 1, 2, features=(4, 4, 8, 8, 16, 4))
    if name == "SegResNet":
        return nets.SegResNet(d, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    if name == "DynUNet":
        return nets.DynUNet(d, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], norm_name="batch")
    if name == "UNETR":
        return nets.UNETR(1, 2, (16,) * d, feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2, spatial_dims=d)
    raise KeyError(name)


CLS = ["DenseNet121", "ResNet18", "EfficientNetBN", "SEResNet"]
SEG = ["UNet", "BasicUNet", "SegResNet", "DynUNet", "UNETR"]
CASES = [(n, d, "cls") for n in CLS for d in (2, 3)] + [(n, d, "seg") for n in SEG for d in (2, 3)]


def _inputs(name, kind, d, dtype):
    size = 32 if kind == "cls" else 16
    if name == "BasicUNet":
        size = 32
    x = torch.randn(3, 1, *(size,) * d, dtype=dtype)
    y = torch.tensor([0, 1, 1]) if kind == "cls" else torch.randint(0, 2, (3, 1, *(size,) * d))
    return x, y


def _loss(kind):
    if kind == "cls":
        return nn.CrossEntropyLoss()
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


@pytest.mark.parametrize("method", ["auto", "expanded"])
@pytest.mark.parametrize("name, d, kind", CASES, ids=[f"{n}-{d}d" for n, d, _ in CASES])
def test_per_sample_gradients_equal_per_example_autograd(name, d, kind, method):
    # float64 for a tight tolerance; UNETR runs in float32 because torch's float64 conv-transpose
    # backward under vmap fails on its non-contiguous inputs (a torch limitation; float32 works)
    dtype = torch.float32 if name == "UNETR" else torch.float64
    torch.manual_seed(0)
    net = _cls(name, d) if kind == "cls" else _seg(name, d)
    net, report = make_private_compatible(net)
    net = net.to(dtype).train()
    for m in net.modules():  # dropout draws differ between the two computations; the gradient math does not
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if hasattr(m, "drop_connect_rate"):  # EfficientNet's stochastic depth
            m.drop_connect_rate = 0.0
    x, y = _inputs(name, kind, d, dtype)
    loss = _loss(kind)
    sampler = PerSampleGradients(net, loss, method=method)
    grads, losses, preds = sampler(x, y)
    assert losses.shape == (3,)
    # cross-entropy runs under vmap; MONAI's DiceCELoss (one_hot's in-place scatter) does not
    assert sampler.method == ("expanded" if method == "expanded" or kind == "seg" else "vmap_grad")
    for i in range(3):
        net.zero_grad()
        loss(net(x[i : i + 1]), y[i : i + 1]).backward()
        ref = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                         for _, p in net.named_parameters()])
        got = torch.cat([grads[n][i].flatten() for n, _ in net.named_parameters()])
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert float((got - ref).norm()) <= tol * max(float(ref.norm()), 1e-12), name


def test_conversion_report_and_shared_parameters():
    net = nets.DynUNet(2, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], norm_name="batch")
    bn_params = [id(p) for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net, report = make_private_compatible(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert any("BatchNorm2d" in before and "GroupNorm" in after for _, before, after in report.changes)
    assert "make_private_compatible" in str(report)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in net.parameters()} == in_opt  # optimizer built before conversion stays valid
    assert set(bn_params) <= in_opt


def test_inplace_activations_made_out_of_place():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True))
    net, report = make_private_compatible(net)
    assert net[1].inplace is False
    assert ("1", "ReLU(inplace=True)", "inplace=False") in report.changes


def test_groupnorm_groups_divide_channels():
    net = nn.Sequential(nn.Conv2d(1, 48, 3), nn.BatchNorm2d(48), nn.Conv2d(48, 6, 1), nn.BatchNorm2d(6))
    net, _ = make_private_compatible(net)
    assert (net[1].num_groups, net[3].num_groups) == (24, 3)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent control flow: cannot run per example under vmap
            return x
        return -x


def test_failure_names_the_layer():
    from monai_dp.utils.errors import DPIncompatibleModuleError

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Identity(), _DataDependent()), nn.Flatten(),
                        nn.LazyLinear(2))
    net(torch.randn(1, 1, 8, 8))
    with pytest.raises(DPIncompatibleModuleError, match=r"`1\.1`: per-sample gradients failed in _DataDependent"):
        PerSampleGradients(net, nn.CrossEntropyLoss())(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
