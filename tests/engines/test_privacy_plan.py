"""A privacy plan that outlives a run: MONAI FL's pattern (run again with a larger max_epochs) and a budget handed
from one trainer to the next continue one σ and one accounting (issue 12)."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.utils.errors import DPConfigurationError
from tests.conftest import TinyClassifier, make_classification_data

DATA = make_classification_data(n=40)


def _trainer(max_epochs=1, batch_size=4, **kw):
    net = TinyClassifier()
    return DPSupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=DataLoader(DATA, batch_size=batch_size),
                               network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                               loss_function=nn.CrossEntropyLoss(), grad_sample_mode="per_sample", **kw)


def test_running_again_with_a_larger_max_epochs_continues_one_plan():
    """MonaiAlgo: state.max_epochs = epoch + local_epochs, then run() again, once per round."""
    one_go = _trainer(max_epochs=4, target_epsilon=3.0, target_delta=1e-3)
    one_go.run()
    rounds = _trainer(max_epochs=1, planned_epochs=4, target_epsilon=3.0, target_delta=1e-3)
    sigma = rounds.optimizer.noise_multiplier
    for round_ in range(1, 5):
        rounds.state.max_epochs = round_
        rounds.run()
        assert rounds.dp_steps == 10 * round_
    assert sigma == one_go.optimizer.noise_multiplier  # calibrated over the plan, not over one round
    assert rounds.privacy.accountant.history == one_go.privacy.accountant.history == [(sigma, 0.1, 40)]
    assert rounds.get_epsilon() == one_go.get_epsilon() <= 3.0
    calibrated_for_one_round = _trainer(max_epochs=1, target_epsilon=3.0, target_delta=1e-3)
    assert calibrated_for_one_round.optimizer.noise_multiplier < sigma


def test_more_rounds_than_planned_stop_at_the_budget():
    trainer = _trainer(max_epochs=1, planned_epochs=2, target_epsilon=3.0, target_delta=1e-3)
    for round_ in range(1, 5):
        trainer.state.max_epochs = round_
        trainer.run()
    assert trainer.state.dp_budget_exhausted and trainer.get_epsilon() <= 3.0
    assert trainer.state.iteration == trainer.dp_steps < 40


def test_a_budget_handed_to_a_new_trainer_continues_its_accounting():
    one_go = _trainer(max_epochs=3, target_epsilon=3.0, target_delta=1e-3)
    one_go.run()
    first = _trainer(max_epochs=1, planned_epochs=3, target_epsilon=3.0, target_delta=1e-3)
    first.run()
    second = _trainer(max_epochs=2, privacy_budget=first.privacy)
    assert second.privacy is first.privacy and second.optimizer.noise_multiplier == first.optimizer.noise_multiplier
    second.run()
    assert second.dp_steps == 30
    assert second.privacy.accountant.history == one_go.privacy.accountant.history
    assert second.get_epsilon() == one_go.get_epsilon()


def test_a_handed_budget_refuses_other_settings_and_another_sampling():
    first = _trainer(noise_multiplier=1.0, target_delta=1e-3)
    with pytest.raises(DPConfigurationError, match=r"`noise_multiplier` must be None with `privacy_budget`"):
        _trainer(privacy_budget=first.privacy, noise_multiplier=2.0)
    with pytest.raises(DPConfigurationError, match=r"`sample_rate` must be 0.1 as in the handed-in budget, got 0.2"):
        _trainer(privacy_budget=first.privacy, batch_size=8)
    with pytest.raises(TypeError, match=r"`privacy_budget` must be a monai_dp.privacy.budget.PrivacyBudget"):
        _trainer(privacy_budget={"epsilon": 1})
