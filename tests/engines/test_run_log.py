"""What a run tells its user: restored σ and steps on resume, why a run took no step, progress lines."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.data import DataLoader
from monai.handlers import CheckpointLoader

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.engines import run_log as run_log_module
from monai_dp.engines.run_log import check_progress_interval, describe_history
from monai_dp.utils.keys import DPKeys
from tests.conftest import TinyClassifier, make_classification_data

LOGGER = "ignite.engine.engine.DPSupervisedTrainer"


def _trainer(max_epochs: int, batch_size: int = 8, **dp) -> DPSupervisedTrainer:
    torch.manual_seed(0)
    net = TinyClassifier()
    return DPSupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=DataLoader(make_classification_data(16), batch_size=batch_size),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.CrossEntropyLoss(),
        target_delta=1e-3, accountant="rdp", grad_sample_mode="per_sample", **dp)


def test_a_resume_reports_the_restored_sigma_and_steps_not_the_freshly_calibrated_ones(tmp_path, caplog):
    first = _trainer(1, noise_multiplier=2.0, target_epsilon=50.0, progress_interval=None)
    first.run()
    steps = first.dp_steps
    torch.save({"trainer": first.state_dict()}, tmp_path / "ckpt.pt")

    caplog.set_level(logging.INFO, logger=LOGGER)
    again = _trainer(1, target_epsilon=20.0, progress_interval=None)  # would calibrate another σ
    fresh_sigma = again.privacy.noise_multiplier
    assert fresh_sigma != pytest.approx(2.0, rel=1e-3)
    CheckpointLoader(load_path=str(tmp_path / "ckpt.pt"), load_dict={"trainer": again}).attach(again)
    again.run()

    assert again.dp_steps == steps
    assert getattr(again.state, DPKeys.NOISE_MULTIPLIER) == 2.0  # the σ of the steps taken, not the fresh one
    text = caplog.text
    assert f"Continuing an accounting of {steps} steps (σ = 2, q = 0.5)" in text
    assert f"this run's steps use σ = {fresh_sigma:.4g} (this trainer's σ, not the restored one" in text
    assert "No DP step taken in this run: the trainer is already at epoch 1 of max_epochs = 1" in text


def test_after_a_resume_the_steps_of_this_run_report_their_own_sigma(tmp_path):
    first = _trainer(1, noise_multiplier=2.0, target_epsilon=50.0, progress_interval=None)
    first.run()
    torch.save({"trainer": first.state_dict()}, tmp_path / "ckpt.pt")
    again = _trainer(2, noise_multiplier=3.0, target_epsilon=50.0, progress_interval=None)
    CheckpointLoader(load_path=str(tmp_path / "ckpt.pt"), load_dict={"trainer": again}).attach(again)
    again.run()
    assert again.dp_steps == first.dp_steps + 2
    assert getattr(again.state, DPKeys.NOISE_MULTIPLIER) == 3.0
    assert [h[0] for h in again.privacy.accountant.history] == [2.0, 3.0]


def test_progress_lines_every_n_iterations_but_not_at_the_epoch_end(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer = _trainer(1, batch_size=2, noise_multiplier=1.0, target_epsilon=500.0, progress_interval=2)
    trainer.run()  # 8 iterations: lines after the 2nd, 4th and 6th; the 8th ends the epoch (its own lines)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch 1/1: iteration")]
    assert [line.split(",")[0] for line in lines] == [f"Epoch 1/1: iteration {i}/8" for i in (2, 4, 6)]
    assert "4 DP steps so far" in lines[1]


def test_auto_progress_lines_come_once_enough_time_has_passed(caplog, monkeypatch):
    clock = iter(range(0, 10_000, 11))  # every reading is 11 s after the previous one
    monkeypatch.setattr(run_log_module.time, "perf_counter", lambda: float(next(clock)))
    caplog.set_level(logging.INFO, logger=LOGGER)
    _trainer(1, batch_size=2, noise_multiplier=1.0, target_epsilon=500.0).run()  # default "auto": >= 30 s apart
    lines = [r.getMessage().split(",")[0] for r in caplog.records if r.getMessage().startswith("Epoch 1/1: iteration")]
    assert lines == ["Epoch 1/1: iteration 3/8", "Epoch 1/1: iteration 6/8"]


@pytest.mark.parametrize("bad", [0, "often", 2.5])
def test_progress_interval_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="progress_interval"):
        check_progress_interval(bad)


def test_history_is_described_with_ranges_where_sigma_changed():
    assert describe_history([(1.0, 0.5, 3)]) == "σ = 1, q = 0.5"
    assert describe_history([(1.0, 0.5, 3), (2.0, 0.5, 1)]) == "σ = 1 to 2, q = 0.5"
