"""make_per_sample_loss: a Dice-family ``batch=True`` is switched to per-example, logged; other pooling refused."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    DiceLoss,
    GeneralizedDiceFocalLoss,
)
from torch import nn

from monai_dp.losses import check_per_sample_loss, make_per_sample_loss
from monai_dp.utils.errors import DPConfigurationError


def _batch(b: int = 4, classes: int = 3, size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, classes, size, size, size, generator=g)
    label = torch.randint(0, classes, (b, 1, size, size, size), generator=g).float()
    label[0] = 0  # one example without foreground: where batch-pooled and per-example Dice differ most
    return pred, label


def test_dice_ce_batch_is_switched_logged_and_per_example(caplog):
    loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True, include_background=False)
    pred, label = _batch()
    pooled = loss(pred, label)
    with caplog.at_level(logging.WARNING, logger="monai_dp.losses.checks"):
        same, changed = make_per_sample_loss(loss)
    assert same is loss and changed == ["loss_function.dice.batch"]
    assert loss.dice.batch is False
    line = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "loss_function.dice.batch: True -> False" in line.getMessage()
    assert "DiceLoss(batch=True) pools its statistics over the batch" in line.getMessage()
    check_per_sample_loss(loss)  # nothing left to refuse
    # per example: the batch loss is the mean of each example's loss computed alone
    alone = torch.stack([loss(pred[i:i + 1], label[i:i + 1]) for i in range(len(pred))])
    torch.testing.assert_close(loss(pred, label), alone.mean())
    assert not torch.allclose(pooled, alone.mean(), atol=1e-3)  # the pooled loss was another loss


def test_nested_losses_are_switched_at_every_level():
    inner = GeneralizedDiceFocalLoss(to_onehot_y=True, softmax=True, batch=True)
    loss = DeepSupervisionLoss(inner)
    _, changed = make_per_sample_loss(loss)
    assert changed == ["loss_function.loss.generalized_dice.batch"]
    check_per_sample_loss(loss)
    pred, label = _batch(seed=1)
    alone = torch.stack([inner(pred[i:i + 1], label[i:i + 1]) for i in range(len(pred))])
    torch.testing.assert_close(inner(pred, label), alone.mean())


def test_per_example_dice_values_equal_each_example_alone():
    loss = DiceLoss(to_onehot_y=True, softmax=True, batch=True, reduction="none")
    make_per_sample_loss(loss)
    pred, label = _batch(seed=2)
    values = loss(pred, label).flatten(1).mean(1)  # (B,)
    alone = torch.stack([loss(pred[i:i + 1], label[i:i + 1]).mean() for i in range(len(pred))])
    torch.testing.assert_close(values, alone)


def test_per_example_loss_is_left_alone(caplog):
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    with caplog.at_level(logging.WARNING):
        assert make_per_sample_loss(loss)[1] == []
    assert not caplog.records


class _PooledOtherwise(DiceLoss):
    """A subclass may use ``batch`` for something else: it is not switched, so it stays refused."""


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))

    def forward(self, pred, target):
        return (self.features(pred) - self.features(target)).pow(2).mean()


@pytest.mark.parametrize("loss, found", [
    (_PooledOtherwise(batch=True), r"_PooledOtherwise with loss_function.batch"),
    (_WithBatchNorm(), r"_WithBatchNorm with loss_function.features.1 \(BatchNorm2d\)"),
])
def test_pooling_that_is_not_a_reduction_switch_stays_refused(loss, found):
    assert make_per_sample_loss(loss)[1] == []
    with pytest.raises(DPConfigurationError, match=r"`loss_function` must be a per-example loss \(no batch-level "
                                                   rf"reduction\) for DP training, got '{found}'\."):
        check_per_sample_loss(loss)


def test_not_callable():
    with pytest.raises(TypeError, match=r"`loss_function` must be callable, got 'int'"):
        make_per_sample_loss(3)
