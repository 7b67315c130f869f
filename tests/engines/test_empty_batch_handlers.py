"""An empty Poisson batch (a noise-only step) leaves an output that MONAI's metrics and loggers accept: metrics
count only the items trained on, loggers log no loss for the step; the step itself is still taken and accounted."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from monai.data import DataLoader
from monai.handlers import MeanDice, StatsHandler, from_engine
from monai.losses import DiceLoss
from monai.metrics import compute_dice
from monai.transforms import Activationsd, AsDiscreted, Compose
from torch import nn

from monai_dp.data import is_empty_batch
from monai_dp.engines import DPSupervisedTrainer
from tests.conftest import TinyClassifier, make_classification_data

# N = 12 items, batch 1: q = 1/12, a batch is empty with probability (11/12)^12 ≈ 0.35; this sampling seed gives
# empty and non-empty batches in the first epoch (checked by every test through _Steps)
N, SAMPLING_SEED = 12, 3


class _Steps:
    """Records, before each iteration runs, whether its batch is empty; after it, the items it trained on."""

    def __init__(self, trainer: DPSupervisedTrainer) -> None:
        self.empty: list[int] = []  # global iteration numbers of empty batches
        self.trained: list[int] = []
        self.items = 0  # items in the non-empty batches
        self.outputs: dict[int, object] = {}
        trainer.add_event_handler(Events.ITERATION_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _started(self, engine) -> None:
        batch = engine.state.batch
        (self.empty if is_empty_batch(batch) else self.trained).append(engine.state.iteration)
        self.items += 0 if is_empty_batch(batch) else len(batch["image"])

    def _completed(self, engine) -> None:
        self.outputs[engine.state.iteration] = engine.state.output

    def check_mixed(self, trainer: DPSupervisedTrainer) -> None:
        """The run had both kinds of batch, and every iteration, empty ones included, was an accounted step."""
        assert self.empty and self.trained, f"need empty and non-empty batches, got {self.empty}, {self.trained}"
        assert trainer.dp_steps == trainer.state.iteration == len(self.empty) + len(self.trained)


def _trainer(data, net, loss, **kw) -> DPSupervisedTrainer:
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return DPSupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=1), network=net, optimizer=opt,
        loss_function=loss, noise_multiplier=1.0, max_grad_norm=1.0, sampling_seed=SAMPLING_SEED, noise_seed=0, **kw)


def _classifier_trainer(**kw) -> DPSupervisedTrainer:
    torch.manual_seed(0)
    return _trainer(make_classification_data(n=N), TinyClassifier(), nn.CrossEntropyLoss(), **kw)


def _segmentation_data(n: int = N, size: int = 8) -> list[dict]:
    """(1, size, size) images whose foreground square (label 1) is brighter; every label has foreground."""
    rng = np.random.default_rng(0)
    data = []
    for i in range(n):
        label = np.zeros((1, size, size), dtype=np.float32)
        r, c = i % 4, (i // 4) % 4
        label[:, r : r + 4, c : c + 4] = 1.0
        image = (rng.normal(size=label.shape) + 2.0 * label).astype(np.float32)
        data.append({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
    return data


def _items(outputs, key) -> list:
    return [item[key] for out in outputs for item in out]


@pytest.mark.parametrize("decollate", [True, False])
def test_accuracy_counts_only_the_items_trained_on(decollate):
    trainer = _classifier_trainer(decollate=decollate,
                                  key_train_metric={"acc": Accuracy(output_transform=from_engine(["pred", "label"]))})
    steps = _Steps(trainer)
    trainer.run()
    steps.check_mixed(trainer)
    for i in steps.empty:
        assert from_engine(["pred", "label"])(steps.outputs[i]) == ([], [])
    trained = [steps.outputs[i] for i in steps.trained]
    if not decollate:  # a batch dict per step: make it the decollated form
        trained = [[{"pred": p, "label": y} for p, y in zip(o["pred"], o["label"])] for o in trained]
    preds, labels = _items(trained, "pred"), _items(trained, "label")
    assert len(preds) == len(labels) == steps.items
    expected = sum(int(p.argmax() == y) for p, y in zip(preds, labels)) / len(preds)
    assert trainer.state.metrics["acc"] == pytest.approx(expected)


def test_mean_dice_with_postprocessing_counts_only_the_items_trained_on():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    post = Compose([Activationsd(keys="pred", softmax=True),
                    AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2)])
    trainer = _trainer(_segmentation_data(), net, DiceLoss(to_onehot_y=True, softmax=True), postprocessing=post,
                       key_train_metric={"dice": MeanDice(include_background=False,
                                                          output_transform=from_engine(["pred", "label"]))})
    steps = _Steps(trainer)
    trainer.run()
    steps.check_mixed(trainer)
    trained = [steps.outputs[i] for i in steps.trained]
    preds, labels = torch.stack(_items(trained, "pred")), torch.stack(_items(trained, "label"))
    assert preds.shape == labels.shape == (steps.items, 2, 8, 8)
    expected = compute_dice(preds, labels, include_background=False).mean().item()
    assert trainer.state.metrics["dice"] == pytest.approx(expected)
    assert len(trainer.state.metric_details["dice"]) == steps.items


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_stats_handler_logs_no_loss_for_an_empty_step():
    trainer = _classifier_trainer()
    name = "dp_empty_step_stats"
    StatsHandler(name=name, iteration_log=True, epoch_log=False).attach(trainer)  # default: output[0]
    StatsHandler(name=name, iteration_log=True, epoch_log=False, tag_name="first_loss",
                 output_transform=from_engine(["loss"], first=True)).attach(trainer)
    steps = _Steps(trainer)
    lines = _Lines()
    logger = logging.getLogger(name)
    logger.addHandler(lines)
    try:
        trainer.run()
    finally:
        logger.removeHandler(lines)
    steps.check_mixed(trainer)
    for tag in ("loss", "first_loss"):
        logged = [line for line in lines.lines if re.search(rf"(^|\s){tag}: ", line)]
        assert [int(re.search(r"Iter: (\d+)/", line).group(1)) for line in logged] == steps.trained, tag
        assert not any("nan" in line.lower() for line in logged)
    assert len(lines.lines) == 2 * len(steps.trained)  # nothing else is printed for the empty steps


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_no_loss_for_an_empty_step(tmp_path):
    pytest.importorskip("tensorboard")
    from monai.handlers import TensorBoardStatsHandler

    trainer = _classifier_trainer()
    TensorBoardStatsHandler(log_dir=str(tmp_path / "default"), epoch_log=False).attach(trainer)  # output[0]
    TensorBoardStatsHandler(log_dir=str(tmp_path / "first"), epoch_log=False,
                            output_transform=from_engine(["loss"], first=True)).attach(trainer)
    steps = _Steps(trainer)
    trainer.run()
    steps.check_mixed(trainer)
    for sub, tag in (("default", "loss"), ("first", "Loss")):
        assert list((tmp_path / sub).glob("events.out.tfevents.*")), f"no event file in {sub}"
        scalars = _tensorboard_scalars(tmp_path / sub)
        assert [step for step, _ in scalars[tag]] == steps.trained, sub
        assert all(math.isfinite(value) for _, value in scalars[tag]), sub


@pytest.mark.slow  # most of it is MLflow creating its SQLite schema
def test_mlflow_logs_no_loss_for_an_empty_step(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from monai.handlers import MLFlowHandler

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = _classifier_trainer()
    MLFlowHandler(tracking_uri=uri, output_transform=from_engine(["loss"], first=True), experiment_name="dp_empty",
                  run_name="empty_steps", close_on_complete=True).attach(trainer)
    steps = _Steps(trainer)
    trainer.run()
    steps.check_mixed(trainer)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dp_empty").experiment_id])
    assert run.info.run_name == "empty_steps" and run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "Loss"), key=lambda m: m.step)
    assert [m.step for m in history] == steps.trained
    assert all(math.isfinite(m.value) for m in history)
    # MLFlowHandler logs the learning rate with the loss: nothing at all is logged for an empty step
    lr_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr_group_0"))
    assert lr_steps == steps.trained
