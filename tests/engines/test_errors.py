"""Bad input gets a clear error naming the argument, the value and the fix; never a stack trace from Opacus."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.data import DataLoader
from monai.losses import DiceLoss
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.utils.errors import DPConfigurationError, DPIncompatibleModuleError
from tests.conftest import TinyClassifier, make_classification_data


def build(**over):
    data = over.pop("data", make_classification_data(n=40))
    net = over.pop("network", TinyClassifier())
    kw = dict(device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=4), network=net,
              optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
              noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-3)
    kw.update(over)
    return DPSupervisedTrainer(**kw)


@pytest.mark.parametrize(
    "over, err, match",
    [
        ({"target_epsilon": 0.0}, ValueError, r"`target_epsilon` must be a finite number > 0, got 0.0"),
        ({"target_epsilon": -1.0}, ValueError, r"`target_epsilon` must be a finite number > 0, got -1.0"),
        ({"target_epsilon": float("nan")}, ValueError, r"`target_epsilon` must be a finite number > 0, got nan"),
        ({"noise_multiplier": None}, ValueError, r"`target_epsilon` must be given when `noise_multiplier` is not"),
        ({"noise_multiplier": 0.0}, ValueError, r"`noise_multiplier` must be a finite number > 0, got 0.0"),
        ({"max_grad_norm": 0.0}, ValueError, r"`max_grad_norm` must be a finite number > 0, got 0.0"),
        ({"max_grad_norm": -2}, ValueError, r"`max_grad_norm` must be a finite number > 0, got -2"),
        ({"target_delta": 0.0}, ValueError, r"`target_delta` must be in \(0, 1/N\)"),
        ({"target_delta": -1e-5}, ValueError, r"`target_delta` must be in \(0, 1/N\)"),
        ({"target_delta": 0.025}, ValueError, r"`target_delta` must be in \(0, 1/N\) = \(0, 0.025\) for N = 40"),
        ({"accountant": "gdp"}, ValueError, r"`accountant` must be 'prv', 'pld' or 'rdp' unless "
         r"`allow_approximate_accounting=True`, got 'gdp'\. GDP accounting is a central-limit approximation"),
        ({"accountant": "moments"}, ValueError, r"`accountant` must be one of \['rdp', 'prv', 'gdp', 'pld'\], got 'moments'"),
        ({"max_physical_batch_size": 0}, ValueError, r"`max_physical_batch_size` must be an int >= 1, got 0"),
        ({"accumulation_steps": 0}, ValueError, r"`accumulation_steps` must be an int >= 1, got 0"),
        ({"data": []}, ValueError, r"`train_data_loader.dataset` must be non-empty, got '0 items'"),
        ({"iteration_update": lambda e, b: None}, DPConfigurationError, r"`iteration_update` must be None"),
        ({"compile": True}, DPConfigurationError, r"`compile` must be False with DP training"),
        ({"poisson_sampling": False}, DPConfigurationError, r"`poisson_sampling` must be True unless"),
        ({"loss_function": DiceLoss(batch=True), "make_compatible": False}, DPConfigurationError,
         r"`loss_function` must be a per-example loss.*batch=False"),
        ({"amp": True, "amp_kwargs": {"dtype": torch.float16}}, DPConfigurationError, r"bfloat16"),
    ],
)
def test_bad_arguments(over, err, match):
    with pytest.raises(err, match=match):
        build(**over)


def test_delta_above_one_over_ten_n_warns(caplog):
    with caplog.at_level(logging.WARNING):
        build(target_delta=0.01)
    assert "above 1/(10 N)" in caplog.text


def test_loader_without_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from make_classification_data(8)

    with pytest.raises(TypeError, match=r"`train_data_loader.dataset` must be a dataset with a length, got 'Stream'"):
        build(train_data_loader=DataLoader(Stream(), batch_size=4))


def test_non_loader_iterable():
    with pytest.raises(TypeError, match=r"`train_data_loader` must be a torch.utils.data.DataLoader, got 'list'"):
        build(train_data_loader=[1, 2, 3])


def test_batch_larger_than_dataset():
    with pytest.raises(ValueError, match=r"must be <= the number of records N = 3, got 4"):
        build(data=make_classification_data(n=3))


def test_optimizer_of_other_parameters():
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"`optimizer` must be built on the parameters of `network`"):
        build(optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


def test_loss_without_a_per_sample_value():
    def bad_loss(pred, target):
        return torch.ones(3, requires_grad=True) * pred.sum()

    trainer = build(loss_function=bad_loss)
    with pytest.raises(ValueError, match=r"`loss_function output for one example` must be a scalar or a tensor of shape"):
        trainer.run()


def test_non_poisson_needs_flag_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        t = build(poisson_sampling=False, allow_non_poisson_sampling=True)
    assert "not a proven guarantee" in caplog.text
    assert t.privacy.state_dict()["sampling"] == "loader"


def test_incompatible_network_without_conversion_names_layers():
    with pytest.raises(DPIncompatibleModuleError, match=r"`features.1`: BatchNorm2d .*GroupNorm"):
        build(make_compatible=False)


def test_gdp_needs_the_approximation_flag_and_warns(caplog):
    with caplog.at_level("WARNING"):
        trainer = build(accountant="gdp", allow_approximate_accounting=True)
    assert trainer.privacy.accountant.name == "gdp"
    assert "not a guaranteed bound" in caplog.text
