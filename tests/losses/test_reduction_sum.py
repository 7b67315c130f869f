"""``reduction="sum"`` is accepted: the loss is evaluated per example, so it sums one example's elements only."""

from __future__ import annotations

import logging

import torch

from monai_dp.losses import make_per_sample_loss
from monai_dp.networks import PerSampleGradients


def test_sum_is_per_example_mean_times_its_elements_and_is_said(caplog):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    caplog.set_level(logging.INFO, logger="monai_dp.losses.checks")
    loss_sum, changed = make_per_sample_loss(torch.nn.MSELoss(reduction="sum"))
    assert changed == []
    assert "loss_function.reduction = 'sum': the loss is evaluated on one example at a time" in caplog.text

    grads_sum, losses_sum, _ = PerSampleGradients(net, loss_sum, method="expanded")(x, y)
    grads_mean, losses_mean, _ = PerSampleGradients(net, torch.nn.MSELoss(), method="expanded")(x, y)
    elements = y[0].numel()
    with torch.no_grad():
        own = ((net(x) - y) ** 2).flatten(1).sum(1)  # each example's own sum, not the batch's
    torch.testing.assert_close(losses_sum, own)
    torch.testing.assert_close(losses_sum, losses_mean * elements)
    for name in grads_sum:
        torch.testing.assert_close(grads_sum[name], grads_mean[name] * elements)
