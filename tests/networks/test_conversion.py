"""make_private_compatible: BatchNorm -> GroupNorm on the same parameters, no running statistics, no in-place ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_dp.networks.conversion import find_incompatible_modules, make_private_compatible
from monai_dp.utils.errors import DPIncompatibleModuleError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 12, 3), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
                         nn.Conv2d(12, 6, 1),
                         nn.InstanceNorm2d(6, affine=True, track_running_stats=True), nn.Flatten(), nn.LazyLinear(2))


def test_batchnorm_becomes_groupnorm_on_the_same_parameters():
    net = _net()
    bn = net[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
    optimizer_params = {id(p) for p in net.parameters()}
    converted, report = make_private_compatible(net, max_groups=4)
    assert converted is net
    gn = net[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.num_channels == 12 and gn.eps == bn.eps
    assert gn.weight is bn.weight and gn.bias is bn.bias  # an optimizer built before the conversion keeps working
    assert {id(p) for p in net.parameters()} <= optimizer_params | {id(p) for p in net[-1].parameters()}
    assert ("1", "BatchNorm2d(12)", "GroupNorm(4, 12)") in report.changes


def test_instance_norm_stops_tracking_and_in_place_ops_become_out_of_place():
    net = _net()
    _, report = make_private_compatible(net)
    assert net[4].track_running_stats is False and net[4].running_mean is None
    assert net[2].inplace is False
    paths = {path for path, *_ in report.changes}
    assert paths == {"1", "2", "4"} and len(report) == 3
    assert find_incompatible_modules(net) == []
    assert "3 change(s)" in str(report) and "1 x BatchNorm2d -> GroupNorm" in report.summary()


def test_converted_network_treats_every_row_on_its_own():
    """After conversion a row's output does not depend on the other rows of the batch (it did with BatchNorm)."""
    net = _net()
    x = torch.randn(4, 1, 6, 6)
    net.train()
    net(x)  # materialise the lazy layer
    alone_before, batched_before = net(x[:1]), net(x)[:1]
    assert not torch.allclose(alone_before, batched_before, atol=1e-5), "BatchNorm couples the rows"
    make_private_compatible(net)
    torch.testing.assert_close(net(x[:1]), net(x)[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels, max_groups, expected", [(12, 32, 6), (12, 4, 4), (7, 32, 1), (64, 32, 32),
                                                            (2, 32, 1)])
def test_group_count_leaves_two_channels_per_group(channels, max_groups, expected):
    net = nn.Sequential(nn.Conv2d(1, channels, 1), nn.BatchNorm2d(channels))
    make_private_compatible(net, max_groups=max_groups)
    assert net[1].num_groups == expected


def test_finds_what_mixes_rows_and_refuses_bad_input():
    net = _net()
    found = find_incompatible_modules(net)
    assert [p for p, *_ in found] == ["1", "4"] and "GroupNorm" in found[0][2]
    with pytest.raises(DPIncompatibleModuleError):
        make_private_compatible(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match=r"`network` must be a torch.nn.Module, got 'int'"):
        make_private_compatible(3)
    with pytest.raises(ValueError, match=r"`max_groups` must be an int >= 1, got 0"):
        make_private_compatible(_net(), max_groups=0)
