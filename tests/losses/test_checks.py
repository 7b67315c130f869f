"""Loss checks: batch-coupled losses refused; class-index targets checked against the prediction's channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from monai_dp.losses import check_per_sample_loss, check_targets
from monai_dp.utils.errors import DPConfigurationError

RANGE = r"`targets` must be class indices in \[0, 3\)"
FIX = r"Set the network's output channels to the number of classes, or map the label values onto 0..2"


def test_batch_dice_is_refused():
    with pytest.raises(DPConfigurationError, match=r"`loss_function` must be a per-example loss .* got 'DiceLoss "
                                                    r"with loss_function.batch'"):
        check_per_sample_loss(DiceLoss(batch=True))


@pytest.mark.parametrize("bad", [3, -1, 255])
def test_cross_entropy_class_indices_out_of_range(bad):
    pred = torch.zeros(4, 3)
    targets = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match=RANGE + r" \(or ignore_index \[-100\]\) for CrossEntropyLoss, as the "
                       rf"prediction has 3 channels, got {bad}. " + FIX):
        check_targets(pred, targets, nn.CrossEntropyLoss())


def test_cross_entropy_in_range_ignore_index_and_probabilities_pass():
    pred = torch.zeros(2, 3, 4, 4)
    check_targets(pred, torch.randint(0, 3, (2, 4, 4)), nn.CrossEntropyLoss())
    check_targets(pred, torch.tensor([[0, 1], [2, 255]]).expand(2, 2, 2).repeat(1, 2, 2), nn.CrossEntropyLoss(
        ignore_index=255))
    check_targets(pred, torch.softmax(torch.randn(2, 3, 4, 4), 1), nn.CrossEntropyLoss())  # probabilities


def test_cross_entropy_non_finite_probabilities():
    probs = torch.full((2, 3), 1 / 3)
    probs[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"`targets` must be finite for CrossEntropyLoss, got inf. Check the label"):
        check_targets(torch.zeros(2, 3), probs, nn.CrossEntropyLoss())


def test_dice_ce_one_hot_labels_checked_from_a_one_row_prediction():
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    probe = torch.zeros(1, 3, 4, 4, 4)  # the network's output for one row, computed once
    labels = MetaTensor(torch.randint(0, 3, (4, 1, 4, 4, 4)).float())
    check_targets(probe, labels, loss)
    labels[2, 0, 1, 1, 1] = 3.0
    with pytest.raises(ValueError, match=RANGE + r" for DiceCELoss with to_onehot_y=True, as the prediction has 3 "
                                                 r"channels, got 3. " + FIX):
        check_targets(probe, labels, loss)
    labels[2, 0, 1, 1, 1] = -100.0  # cross-entropy's default ignore_index, which the Dice part cannot one-hot
    with pytest.raises(ValueError, match=RANGE + r" for DiceCELoss with to_onehot_y=True, .* got -100. "):
        check_targets(probe, labels, loss)


def test_dice_ce_fractional_and_nan_labels():
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    pred = torch.zeros(2, 3, 4, 4)
    labels = torch.zeros(2, 1, 4, 4)
    labels[1, 0, 2, 2] = 1.5  # a linearly resampled mask: one-hot would silently truncate it to 1
    with pytest.raises(ValueError, match=r"`targets` must be whole numbers \(class indices\) for DiceCELoss with "
                                         r"to_onehot_y=True, got 1.5. Resample label masks with nearest"):
        check_targets(pred, labels, loss)
    labels[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"`targets` must be finite for DiceCELoss, got nan."):
        check_targets(pred, labels, loss)


def test_dice_loss_with_its_ignore_index_passes():
    labels = torch.zeros(2, 1, 4, 4)
    labels[0, 0, 0, 0] = 255
    check_targets(torch.zeros(2, 3, 4, 4), labels, DiceLoss(to_onehot_y=True, softmax=True, ignore_index=255))


def test_one_hot_targets_without_to_onehot_y_are_not_class_indices():
    one_hot = torch.zeros(2, 3, 4, 4)
    one_hot[:, 0] = 1
    check_targets(torch.zeros(2, 3, 4, 4), one_hot, DiceCELoss(softmax=True))


def test_binary_targets_of_bce_pass():
    pred = torch.zeros(4, 1, 8, 8)
    targets = (torch.rand(4, 1, 8, 8) > 0.5).float()
    check_targets(pred, targets, nn.BCEWithLogitsLoss())
    check_targets(torch.zeros(4, 5), torch.randint(0, 2, (4, 5)).float(), nn.BCEWithLogitsLoss())  # multi-label
    check_targets(pred, targets, DiceCELoss(sigmoid=True))
    check_targets(torch.zeros(4, 1), np.array([[0.0], [1.0], [1.0], [0.0]]), nn.BCEWithLogitsLoss())
    targets[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`targets` must be finite for BCEWithLogitsLoss, got nan"):
        check_targets(pred, targets, nn.BCEWithLogitsLoss())


def test_regression_targets_are_not_class_indices():
    check_targets(torch.zeros(4, 1), torch.tensor([[7], [100], [-3], [2]]), nn.MSELoss())


def test_integer_targets_of_an_unknown_loss_function_are_checked():
    def loss(p, y):
        return nn.functional.cross_entropy(p, y, reduction="none")

    check_targets(torch.zeros(2, 3), torch.tensor([0, 2]), loss)
    with pytest.raises(ValueError, match=RANGE + r" for the loss function with integer targets, .* got 7. "):
        check_targets(torch.zeros(2, 3), torch.tensor([0, 7]), loss)


def test_nothing_to_check():
    check_targets(torch.zeros(2, 3), None, nn.CrossEntropyLoss())
    check_targets(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), nn.CrossEntropyLoss())
