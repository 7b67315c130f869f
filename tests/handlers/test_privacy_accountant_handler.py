"""PrivacyAccountantHandler: publishes ε and the step counters into the engine state, and carries the accounting."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from monai_dp.handlers import PrivacyAccountantHandler
from tests.engines.test_trainer import make_trainer

DELTA = 1e-3


def test_reports_at_another_delta():
    trainer = make_trainer(target_delta=DELTA, handlers=[PrivacyAccountantHandler(delta=1e-6, epsilon_key="eps_1e-6")])
    trainer.run()
    assert trainer.state.metrics["eps_1e-6"] == pytest.approx(trainer.get_epsilon(1e-6))
    assert trainer.state.metrics["eps_1e-6"] > trainer.get_epsilon(DELTA)
    assert trainer.state.dp_delta == 1e-6
    assert "epsilon" not in trainer.state.metrics  # the user's handler replaces the default one


def test_iteration_interval_publishes_epsilon_every_n_iterations():
    seen = []
    trainer = make_trainer(target_delta=DELTA, handlers=[PrivacyAccountantHandler(iteration_interval=3)])

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        seen.append((engine.state.iteration, engine.state.dp_steps, engine.state.dp_epsilon_steps))

    trainer.run()
    assert [s for _, s, _ in seen] == list(range(1, 11))  # the counters every iteration
    # ε was computed at iterations 3, 6, 9 (and at STARTED, with 0 steps) until the epoch end
    assert [e for _, _, e in seen] == [0, 0, 3, 3, 3, 6, 6, 6, 9, 9]
    assert trainer.state.metrics["epsilon"] == trainer.get_epsilon() > 0
    assert trainer.state.dp_noise_multiplier == 1.0 and trainer.state.dp_max_grad_norm == 1.0


def test_state_loaded_before_attach_restores_the_accounting(tmp_path):
    trainer = make_trainer(max_epochs=2, target_delta=DELTA)
    trainer.run()
    handler = PrivacyAccountantHandler()
    handler.attach(trainer)
    torch.save(handler.state_dict(), tmp_path / "h.pt")
    other = make_trainer(target_delta=DELTA)
    assert other.dp_steps == 0
    fresh = PrivacyAccountantHandler()
    fresh.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    fresh.attach(other)
    assert other.dp_steps == trainer.dp_steps == 20
    assert other.get_epsilon() == trainer.get_epsilon()


@pytest.mark.parametrize("kw, match", [({"delta": 1.0}, r"`delta` must be in \(0, 1\), got 1.0"),
                                       ({"iteration_interval": 0}, r"`iteration_interval` must be an int >= 1, got 0")])
def test_arguments_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        PrivacyAccountantHandler(**kw)
