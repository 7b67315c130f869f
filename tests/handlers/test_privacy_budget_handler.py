"""PrivacyBudgetHandler: an own ε cap, the smaller of it and the trainer's budget applies, and it survives a reload."""

from __future__ import annotations

import pytest
import torch

from monai_dp.handlers import PrivacyBudgetHandler
from tests.engines.test_trainer import make_trainer

DELTA = 1e-3


def _capped_run(handler, target_epsilon=50.0, max_epochs=20):
    trainer = make_trainer(max_epochs=max_epochs, noise_multiplier=1.0, target_epsilon=target_epsilon,
                           target_delta=DELTA, accountant="rdp", handlers=[handler])
    trainer.run()
    return trainer


def test_own_cap_smaller_than_the_trainers_applies():
    trainer = _capped_run(PrivacyBudgetHandler(target_epsilon=2.0))
    assert 0 < trainer.dp_steps < 20 * 10
    assert trainer.get_epsilon() <= 2.0
    assert trainer.privacy.accountant.epsilon_after(DELTA, 1.0, 0.1, 1) > 2.0  # one more step would exceed
    assert trainer.state.dp_budget_exhausted


def test_trainers_budget_smaller_than_the_cap_applies():
    trainer = _capped_run(PrivacyBudgetHandler(target_epsilon=40.0), target_epsilon=2.0)
    assert trainer.get_epsilon() <= 2.0
    assert trainer.privacy.accountant.epsilon_after(DELTA, 1.0, 0.1, 1) > 2.0


def test_reloaded_cap_stops_a_new_run_at_the_same_step(tmp_path):
    first = _capped_run(PrivacyBudgetHandler(target_epsilon=2.0))
    handler = PrivacyBudgetHandler(target_epsilon=2.0)
    torch.save(handler.state_dict(), tmp_path / "budget.pt")
    restored = PrivacyBudgetHandler()
    restored.load_state_dict(torch.load(tmp_path / "budget.pt", weights_only=True))
    second = _capped_run(restored)
    assert second.dp_steps == first.dp_steps
    assert second.get_epsilon() == pytest.approx(first.get_epsilon())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_cap_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"`target_epsilon` must be"):
        PrivacyBudgetHandler(target_epsilon=bad)
