"""Contract suite over every handler: idempotent attach, plain state, round trip through weights-only loading."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from monai_dp.handlers import (
    PrivacyAccountantHandler,
    PrivacyBudgetHandler,
    PrivacyReportHandler,
)
from tests.engines.test_trainer import make_trainer


class _Report(PrivacyReportHandler):
    """PrivacyReportHandler with a default report path, so the contract suite can build it without arguments."""

    def __init__(self):
        import tempfile

        super().__init__(report_file=tempfile.mkdtemp() + "/privacy_report.json")


HANDLERS = [PrivacyAccountantHandler, PrivacyBudgetHandler, _Report]


def _count(engine, handler_type):
    return sum(isinstance(getattr(h, "__self__", h), handler_type)
               for ev in engine._event_handlers for h, *_ in engine._event_handlers[ev])


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
    if not isinstance(fresh, _Report):
        assert fresh.state_dict() == handler.state_dict() or isinstance(fresh, PrivacyAccountantHandler)
    if isinstance(fresh, PrivacyAccountantHandler):
        other = make_trainer(target_delta=1e-3, target_epsilon=50.0)
        fresh.attach(other)
        # the accounting round-trips; the digest is of the weights of whichever trainer is attached
        strip = lambda sd: {k: v for k, v in sd.items() if k != "weights_digest"}  # noqa: E731
        assert strip(fresh.state_dict()) == strip(handler.state_dict())


@pytest.mark.parametrize("cls", HANDLERS)
def test_refuses_a_non_dp_engine(cls):
    with pytest.raises(TypeError, match=r"`engine` must be a DP trainer"):
        cls().attach(Engine(lambda e, b: None))


@pytest.mark.parametrize("cls", HANDLERS)
def test_load_state_dict_type_checked(cls):
    with pytest.raises(TypeError, match=r"`state_dict` must be a dict, got 'list'"):
        cls().load_state_dict([1, 2])


def test_report_handler_writes_report_and_metadata_keeping_other_keys(tmp_path):
    import json

    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0", "privacy": {"unit": "record", "note": "kept"}}))
    handler = PrivacyReportHandler(report_file=str(tmp_path / "models" / "report.json"), meta_file=str(meta))
    trainer = make_trainer(target_delta=1e-3, handlers=[handler])
    trainer.run()
    report = json.loads((tmp_path / "models" / "report.json").read_text())
    assert report["steps"] == trainer.dp_steps and report["epsilon"] == trainer.get_epsilon()
    assert report["noise_multiplier"] == 1.0 and report["sample_rate"] == pytest.approx(0.1)
    saved = json.loads(meta.read_text())
    assert saved["version"] == "0.1.0" and saved["privacy"]["note"] == "kept"
    assert saved["privacy"]["epsilon"] == report["epsilon"]


def test_report_handler_writes_on_failure_and_reraises(tmp_path):
    handler = PrivacyReportHandler(report_file=str(tmp_path / "report.json"))
    trainer = make_trainer(target_delta=1e-3, handlers=[handler])

    @trainer.on(Events.ITERATION_COMPLETED(once=3))
    def _boom(engine):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    import json

    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 3


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
