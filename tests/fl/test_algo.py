"""DPMonaiAlgo in process (no federation): one budget across rounds and across a restart, what is refused."""

from __future__ import annotations

import pytest
import torch
from monai.fl.utils.constants import ExtraItems, FlStatistics
from monai.fl.utils.exchange_object import ExchangeObject

from monai_dp.fl.algo import DPMonaiAlgo
from monai_dp.utils.errors import DPConfigurationError
from tests.fl.tiny import BATCH, BUNDLE, pld_epsilon, site_overrides, training_records

pytestmark = pytest.mark.slow


def _algo(tmp_path, **kw):
    kw.setdefault("overrides", site_overrides(tmp_path / "data", seed=3))
    algo = DPMonaiAlgo(str(BUNDLE), num_rounds=3, local_epochs=1, target_epsilon=6.0, output_dir=str(tmp_path / "out"),
                       ledger=str(tmp_path / "ledger.db"), dataset_id="site-a", **kw)
    algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-a"})
    return algo


def _global_weights(algo, seed):
    gen = torch.Generator().manual_seed(seed)
    return ExchangeObject(weights={k: v + 0.01 * torch.randn(v.shape, generator=gen)
                                   for k, v in algo.trainer.network.state_dict().items()})


def test_rounds_and_a_restarted_client_continue_one_accounting(tmp_path):
    first = _algo(tmp_path)
    sigma = first.trainer.optimizer.noise_multiplier
    first.train(_global_weights(first, 0))
    steps_per_round = first.trainer.dp_steps
    first.train(_global_weights(first, 1))
    assert first.trainer.dp_steps == 2 * steps_per_round  # MonaiAlgo's second run continued the same budget
    first.finalize()

    restarted = _algo(tmp_path)  # a new client process: new trainer, same site folder and ledger
    assert restarted.trainer.dp_steps == 2 * steps_per_round and restarted.rounds_done == 2
    assert restarted.trainer.optimizer.noise_multiplier == sigma  # one σ, planned over the 3 rounds
    restarted.train(_global_weights(restarted, 2))
    report = restarted.privacy_report()
    q = BATCH / len(training_records(tmp_path / "data", seed=3))
    assert report["history"] == [[sigma, q, 3 * steps_per_round]]
    assert report["epsilon"] == pytest.approx(pld_epsilon(sigma, q, 3 * steps_per_round, report["delta"]), rel=0.02)
    assert report["epsilon"] <= 6.0 and report["budget_exhausted"]  # the plan is used up after the third round
    assert report["ledger"] == str(tmp_path / "ledger.db") and report["dataset_id"] == "site-a"


def test_sent_statistics_hold_no_validation_metric(tmp_path, monkeypatch):
    algo = _algo(tmp_path)
    own = algo.trainer.get_stats
    # a trainer whose stats carry a metric of the site's validation records (state variables passed to get_stats)
    monkeypatch.setattr(algo.trainer, "get_stats", lambda *v: {**own(*v), "best_validation_metric": 0.9})
    algo.train(_global_weights(algo, 0))
    sent = algo.get_weights()
    assert set(sent.statistics) == {FlStatistics.NUM_EXECUTED_ITERATIONS}
    assert sent.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] == algo.trainer.dp_steps > 0


def test_statistics_and_validation_metrics_are_refused_by_default(tmp_path):
    algo = _algo(tmp_path)
    with pytest.raises(DPConfigurationError, match=r"`allow_nonprivate_statistics` must be True to send data "
                                                    r"statistics, got False\..*pass allow_nonprivate_statistics=True"):
        algo.get_data_stats()
    with pytest.raises(DPConfigurationError, match=r"`allow_validation_metrics` must be True to send validation "
                                                    r"metrics, got False\..*pass allow_validation_metrics=True"):
        algo.evaluate(_global_weights(algo, 0))
    assert algo.evaluator is None  # nothing was built to evaluate with


def test_a_plain_trainer_is_refused(tmp_path):
    plain = {**site_overrides(tmp_path / "data", seed=3), "train#trainer": {
        "_target_": "SupervisedTrainer", "max_epochs": 1, "device": "cpu", "train_data_loader": "@train#dataloader",
        "network": "@network", "loss_function": "@loss", "optimizer": "@optimizer"}}
    with pytest.raises(DPConfigurationError, match=r"`train#trainer` must be a monai_dp.engines.DPSupervisedTrainer, "
                                                    r"got 'SupervisedTrainer'"):
        DPMonaiAlgo(str(BUNDLE), num_rounds=2, output_dir=str(tmp_path / "out"), overrides=plain).initialize()


def test_validation_metrics_when_allowed_come_from_held_out_records_only(tmp_path):
    algo = _algo(tmp_path, allow_validation_metrics=True)  # MonaiAlgo's evaluator: train.json + evaluate.json
    metrics = algo.evaluate(_global_weights(algo, 0)).metrics
    assert 0.0 <= metrics["val_accuracy"] <= 1.0  # on the bundle's test split
    on_training = _algo(tmp_path / "leaky", allow_validation_metrics=True,
                        eval_kwargs={"validate#dataset#data": "$@datalist['training'][:5]"})
    with pytest.raises(DPConfigurationError, match=r"`evaluator data` must be records outside the training set, "
                                                    r"got '5 training records'"):
        on_training.evaluate(_global_weights(on_training, 0))


def test_patient_level_site_samples_and_counts_patients(tmp_path):
    """privacy_unit="patient": the site's budget is per patient (the synthetic data has two records per patient)."""
    algo = _algo(tmp_path, overrides={**site_overrides(tmp_path / "data", seed=3), "privacy_unit": "patient"})
    records = training_records(tmp_path / "data", seed=3)  # the site's data, written by the bundle above
    patients = {r["patient_id"] for r in records}
    algo.train(_global_weights(algo, 0))
    report = algo.privacy_report()
    assert report["unit"] == "patient"
    q = BATCH / len(patients)
    assert report["sample_rate"] == pytest.approx(q, rel=1e-12)
    assert report["sample_rate"] != pytest.approx(BATCH / len(records), rel=1e-3)  # not the record-level rate
    sigma, steps = report["noise_multiplier"], report["steps"]
    assert steps == algo.trainer.dp_steps > 0 and report["history"] == [[sigma, pytest.approx(q), steps]]
    assert report["epsilon"] == pytest.approx(pld_epsilon(sigma, q, steps, report["delta"]), rel=0.02)
