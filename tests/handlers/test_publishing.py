"""PrivacyMetricsHandler publishes under DPKeys; its old name is the same class; the report reads DPKeys too.

A stub trainer (an Ignite engine with a ``privacy`` object) keeps these tests about the handlers alone.
"""

from __future__ import annotations

import json
import warnings

import pytest
from ignite.engine import Engine, Events

import monai_dp.handlers.privacy_report_handler as report_module
from monai_dp.handlers import PrivacyMetricsHandler, PrivacyReportHandler
from monai_dp.utils.keys import DPKeys


class _Accountant:
    name = "rdp"
    history: list = []


class _Privacy:
    """What the handlers read of a DP trainer's privacy state; ε is 0.1 per step, so a stale value shows."""

    def __init__(self):
        self.steps, self.delta, self.target_epsilon = 0, 1e-5, 8.0
        self.noise_multiplier, self.sample_rate, self.max_grad_norm = 1.3, 0.25, 0.7
        self.num_units, self.unit, self.sampling = 8, "record", "poisson"
        self.accountant = _Accountant()

    def get_epsilon(self, delta=None):
        return 0.1 * self.steps

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _trainer(epoch_length=4):
    def step(engine, batch):
        engine.privacy.steps += 1

    engine = Engine(step)
    engine.privacy = _Privacy()
    return engine, list(range(epoch_length))


def test_counters_are_published_under_dp_keys_every_iteration_and_epsilon_at_epoch_end():
    engine, data = _trainer()
    seen = []
    PrivacyMetricsHandler().attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: seen.append({k: getattr(e.state, k, None) for k in DPKeys.COUNTERS}))
    engine.run(data, max_epochs=2)
    assert [s[DPKeys.STEPS] for s in seen] == list(range(1, 9))
    assert {(s[DPKeys.DELTA], s[DPKeys.NOISE_MULTIPLIER], s[DPKeys.SAMPLE_RATE], s[DPKeys.MAX_GRAD_NORM])
            for s in seen} == {(1e-5, 1.3, 0.25, 0.7)}
    assert [s[DPKeys.EPSILON_STEPS] for s in seen] == [0, 0, 0, 0, 4, 4, 4, 4]  # ε computed at STARTED, epoch 1
    assert engine.state.metrics[DPKeys.EPSILON] == pytest.approx(0.8)
    assert getattr(engine.state, DPKeys.EPSILON_STEPS) == 8


def test_iteration_interval_publishes_epsilon_on_those_iterations():
    engine, data = _trainer()
    eps = []
    PrivacyMetricsHandler(delta=1e-3, epsilon_key="eps", iteration_interval=3).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: eps.append(getattr(e.state, DPKeys.EPSILON_STEPS)))
    engine.run(data, max_epochs=1)
    assert eps == [0, 0, 3, 3]
    assert getattr(engine.state, DPKeys.DELTA) == 1e-3 and "eps" in engine.state.metrics


def test_bad_delta_is_refused_in_the_template():
    with pytest.raises(ValueError, match=r"^`delta` must be in \(0, 1\), got 1\.5\.$"):
        PrivacyMetricsHandler(delta=1.5)


def test_old_name_is_the_same_class_and_warns():
    with pytest.warns(DeprecationWarning, match="PrivacyAccountantHandler.*PrivacyMetricsHandler"):
        from monai_dp.handlers import PrivacyAccountantHandler
    with pytest.warns(DeprecationWarning):
        from monai_dp.handlers.privacy_accountant_handler import PrivacyAccountantHandler as old_module_name
    assert PrivacyAccountantHandler is PrivacyMetricsHandler is old_module_name
    # the trainer's "did the user bring one" check holds for either name, either way round
    assert isinstance(PrivacyMetricsHandler(), PrivacyAccountantHandler)
    assert isinstance(PrivacyAccountantHandler(), PrivacyMetricsHandler)
    with pytest.raises(AttributeError, match="PrivacyAccountingHandler"):
        import monai_dp.handlers as handlers

        handlers.PrivacyAccountingHandler  # noqa: B018 - a typo is still an AttributeError


@pytest.mark.parametrize("target", ["monai_dp.handlers.PrivacyAccountantHandler",
                                    "monai_dp.handlers.privacy_accountant_handler.PrivacyAccountantHandler",
                                    "monai_dp.handlers.PrivacyMetricsHandler"])
def test_config_targets_of_both_names_build_the_handler(target):
    from monai.bundle import ConfigParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = ConfigParser({"h": {"_target_": target, "iteration_interval": 2}}).get_parsed_content("h")
    assert type(handler) is PrivacyMetricsHandler and handler.iteration_interval == 2


def test_report_reads_budget_exhausted_under_its_key(tmp_path):
    engine, data = _trainer()
    handler = PrivacyReportHandler(str(tmp_path / "report.json"))
    handler.attach(engine)
    engine.run(data, max_epochs=1)
    assert json.loads((tmp_path / "report.json").read_text())["budget_exhausted"] is False
    setattr(engine.state, DPKeys.BUDGET_EXHAUSTED, True)
    handler.write(engine)
    assert json.loads((tmp_path / "report.json").read_text())["budget_exhausted"] is True
    assert handler.last_report["steps"] == 4


def test_report_is_written_by_rank_zero_only(tmp_path, monkeypatch):
    engine, data = _trainer()
    monkeypatch.setattr(report_module, "rank_world", lambda: (1, 2))
    PrivacyReportHandler(str(tmp_path / "report.json")).attach(engine)
    engine.run(data, max_epochs=1)
    assert not (tmp_path / "report.json").exists()
    monkeypatch.setattr(report_module, "rank_world", lambda: (0, 2))
    PrivacyReportHandler(str(tmp_path / "report.json")).write(engine)
    assert (tmp_path / "report.json").exists()
