"""Contract suite over every handler: idempotent attach, plain state, round trip through weights-only loading."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_dp.handlers import PrivacyAccountantHandler, PrivacyBudgetHandler
from tests.engines.test_trainer import make_trainer

HANDLERS = [PrivacyAccountantHandler, PrivacyBudgetHandler]


def _count(engine, handler_type):
    return sum(isinstance(h, handler_type) for ev in engine._event_handlers for h, *_ in engine._event_handlers[ev])


@pytest.mark.parametrize("cls", HANDLERS)
def test_attach_is_idempotent(cls):
    trainer = make_trainer(target_delta=1e-3, target_epsilon=50.0)
    before = _count(trainer, cls)
    handler = cls()
    handler.attach(trainer)
    after_one = _count(trainer, cls)
    handler.attach(trainer)
    assert _count(trainer, cls) == after_one > before


@pytest.mark.parametrize("cls", HANDLERS)
def test_state_is_plain_and_round_trips(cls, tmp_path):
    trainer = make_trainer(target_delta=1e-3, target_epsilon=50.0)
    trainer.run()
    handler = cls()
    handler.attach(trainer)
    torch.save(handler.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = cls()
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == handler.state_dict() or isinstance(fresh, PrivacyAccountantHandler)
    if isinstance(fresh, PrivacyAccountantHandler):
        other = make_trainer(target_delta=1e-3, target_epsilon=50.0)
        fresh.attach(other)
        assert fresh.state_dict() == handler.state_dict()


@pytest.mark.parametrize("cls", HANDLERS)
def test_refuses_a_non_dp_engine(cls):
    with pytest.raises(TypeError, match=r"`engine` must be a DP trainer"):
        cls().attach(Engine(lambda e, b: None))


@pytest.mark.parametrize("cls", HANDLERS)
def test_load_state_dict_type_checked(cls):
    with pytest.raises(TypeError, match=r"`state_dict` must be a dict, got 'list'"):
        cls().load_state_dict([1, 2])


def test_budget_handler_own_cap_is_smaller_budget():
    trainer = make_trainer(max_epochs=20, noise_multiplier=1.0, target_epsilon=50.0, target_delta=1e-3,
                           accountant="rdp", handlers=[PrivacyBudgetHandler(target_epsilon=2.0)])
    trainer.run()
    assert trainer.get_epsilon() <= 2.0
    assert trainer.privacy.accountant.epsilon_after(1e-3, 1.0, 0.1, 1) > 2.0


def test_accountant_handler_reports_at_another_delta():
    trainer = make_trainer(target_delta=1e-3, handlers=[PrivacyAccountantHandler(delta=1e-6, epsilon_key="eps_1e-6")])
    trainer.run()
    assert trainer.state.metrics["eps_1e-6"] == pytest.approx(trainer.get_epsilon(1e-6))
    assert trainer.state.metrics["eps_1e-6"] > trainer.get_epsilon(1e-3)
    assert "epsilon" not in trainer.state.metrics  # the user's handler replaces the default one
