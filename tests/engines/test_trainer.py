"""DPSupervisedTrainer as a drop-in for SupervisedTrainer: runs, accounts, stops at the budget, resumes exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    CheckpointSaver,
    StatsHandler,
    ValidationHandler,
)
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers import PrivacyAccountantHandler, PrivacyBudgetHandler
from monai_dp.utils.errors import (
    DPConfigurationError,
    DPIncompatibleModuleError,
    PrivacyBudgetExhaustedError,
)
from tests.conftest import TinyClassifier, make_classification_data


def _reference_epsilon(sigma, q, steps, delta):
    """ε from Google's dp_accounting PLD accountant, independent of Opacus."""
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def make_trainer(data=None, max_epochs=1, batch_size=4, handlers=None, **kw):
    data = make_classification_data(n=40) if data is None else data
    torch.manual_seed(0)
    net = TinyClassifier()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    kw.setdefault("max_grad_norm", 1.0)
    if "target_epsilon" not in kw:
        kw.setdefault("noise_multiplier", 1.0)
    return DPSupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=DataLoader(data, batch_size=batch_size),
                               network=net, optimizer=opt, loss_function=nn.CrossEntropyLoss(), train_handlers=handlers,
                               **kw)


def test_is_a_supervised_trainer_and_reports_epsilon():
    trainer = make_trainer(max_epochs=2, target_delta=1e-3, sampling_seed=0)
    assert isinstance(trainer, SupervisedTrainer)
    trainer.run()
    assert trainer.dp_steps == 2 * 10 == trainer.state.dp_steps
    eps = trainer.get_epsilon()
    assert trainer.state.metrics["epsilon"] == eps
    assert eps == pytest.approx(_reference_epsilon(1.0, 0.1, 20, 1e-3), rel=0.03)
    assert trainer.state.dp_noise_multiplier == 1.0 and trainer.state.dp_sample_rate == pytest.approx(0.1)


def test_noise_calibrated_from_target_epsilon():
    trainer = make_trainer(max_epochs=3, target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    trainer.run()
    assert trainer.dp_steps == 30
    assert trainer.get_epsilon() <= 2.0
    assert trainer.get_epsilon() > 1.9  # calibrated, not loose


def test_budget_cap_stops_before_exceeding(caplog):
    trainer = make_trainer(max_epochs=50, noise_multiplier=0.8, target_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    with caplog.at_level(logging.INFO, logger=trainer.logger.name):
        trainer.run()
    steps = trainer.dp_steps
    assert 0 < steps < 500
    eps = trainer.get_epsilon()
    assert eps <= 3.0
    assert trainer.privacy.accountant.epsilon_after(1e-3, 0.8, 0.1, 1) > 3.0  # one more step would exceed
    assert trainer.state.dp_budget_exhausted is True
    assert "Privacy budget reached" in caplog.text


def test_budget_stops_gracefully_with_no_budget_handler_and_the_iteration_backstop_raises():
    trainer = make_trainer(max_epochs=50, noise_multiplier=0.8, target_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    assert not any(isinstance(getattr(h, "__self__", h), PrivacyBudgetHandler)
                   for hs in trainer._event_handlers.values() for h, *_ in hs)
    trainer.run()  # the trainer's own gate stops it: no exception
    assert trainer.state.dp_budget_exhausted and trainer.state.dp_stopped_by == "epsilon"
    assert trainer.get_epsilon() <= 3.0 < trainer.privacy.accountant.epsilon_after(1e-3, 0.8, 0.1, 1)
    # with the gate removed (it cannot be, short of Ignite internals), the iteration itself still refuses the step
    again = make_trainer(max_epochs=50, noise_multiplier=0.8, target_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    again.remove_event_handler(again._budget_gate, Events.ITERATION_STARTED)
    with pytest.raises(PrivacyBudgetExhaustedError, match="one more step would exceed"):
        again.run()
    assert again.dp_steps == trainer.dp_steps == again.state.iteration


def test_budget_too_small_for_one_step():
    with pytest.raises(PrivacyBudgetExhaustedError, match="`target_epsilon` must be large enough for one step"):
        make_trainer(noise_multiplier=0.3, target_epsilon=0.01, target_delta=1e-3)


def test_checkpoint_resume_continues_accounting_exactly(tmp_path):
    uninterrupted = make_trainer(max_epochs=3, target_delta=1e-3, accountant="prv")
    uninterrupted.run()

    first = make_trainer(max_epochs=1, target_delta=1e-3, accountant="prv")
    saver = CheckpointSaver(str(tmp_path), {"trainer": first, "net": first.network}, save_final=True,
                            final_filename="ckpt.pt")
    saver.attach(first)
    first.run()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not any(k.startswith("_module.") for k in ckpt["net"])  # plain weights for CheckpointLoader and bundles
    assert ckpt["trainer"]["privacy"]["accountant"]["history"]

    resumed = make_trainer(max_epochs=3, target_delta=1e-3, accountant="prv")
    CheckpointLoader(str(tmp_path / "ckpt.pt"), {"trainer": resumed, "net": resumed.network}).attach(resumed)
    resumed.run()
    assert resumed.dp_steps == uninterrupted.dp_steps == 30
    assert resumed.get_epsilon() == pytest.approx(uninterrupted.get_epsilon(), rel=1e-9)


def test_handler_state_round_trips_weights_only(tmp_path):
    trainer = make_trainer(max_epochs=1, target_delta=1e-3)
    trainer.run()
    handler = PrivacyAccountantHandler()
    handler.attach(trainer)
    handler.attach(trainer)  # idempotent
    assert len([h for h, *_ in trainer._event_handlers[Events.ITERATION_COMPLETED]
                if isinstance(getattr(h, "__self__", h), PrivacyAccountantHandler)]) == 2  # the trainer's + this
    torch.save(handler.state_dict(), tmp_path / "h.pt")
    other = make_trainer(max_epochs=1, target_delta=1e-3)
    fresh = PrivacyAccountantHandler()
    fresh.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    fresh.attach(other)
    assert other.dp_steps == trainer.dp_steps
    assert other.get_epsilon() == trainer.get_epsilon()
    budget = PrivacyBudgetHandler(target_epsilon=5.0)
    torch.save(budget.state_dict(), tmp_path / "b.pt")
    restored = PrivacyBudgetHandler()
    assert restored.state_dict() != budget.state_dict()
    restored.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert restored.state_dict() == budget.state_dict()
    assert restored.target_epsilon == 5.0


def test_load_state_without_privacy_is_refused():
    trainer = make_trainer(target_delta=1e-3)
    with pytest.raises(ValueError, match="'privacy' entry"):
        trainer.load_state_dict({"iteration": 10, "epoch_length": 10, "max_epochs": 1, "epoch": 1})


def test_works_with_evaluator_and_monai_handlers(tmp_path):
    from ignite.metrics import Accuracy
    from monai.handlers import from_engine

    val_loader = DataLoader(make_classification_data(n=12, seed=1), batch_size=4)
    trainer = make_trainer(max_epochs=2, target_delta=1e-3)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=val_loader, network=trainer.network,
        key_val_metric={"val_acc": Accuracy(output_transform=lambda o: (o["pred"].argmax(1), o["label"]))},
        decollate=False,
        val_handlers=[CheckpointSaver(str(tmp_path), {"net": trainer.network}, save_key_metric=True)],
    )
    ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    StatsHandler(name="dp_test", tag_name="loss", output_transform=from_engine(["loss"], first=True)).attach(trainer)
    trainer.run()
    assert "val_acc" in evaluator.state.metrics
    saved = list(tmp_path.glob("*.pt"))
    assert saved, "best-metric checkpoint written"
    sd = torch.load(saved[0], weights_only=True)
    trainer.network.load_state_dict(sd)


def test_amp_bf16_trains_and_fp16_is_refused():
    trainer = make_trainer(max_epochs=1, target_delta=1e-3, amp=True)
    trainer.run()
    assert trainer.dp_steps == 10 and trainer.scaler is None
    with pytest.raises(DPConfigurationError, match=r"amp_kwargs\['dtype'\].*bfloat16"):
        make_trainer(target_delta=1e-3, amp=True, amp_kwargs={"dtype": torch.float16})


def test_instantiable_from_bundle_config():
    from monai.bundle import ConfigParser

    config = {
        "network": {"_target_": "tests.conftest.TinyClassifier"},
        "data": "$helpers.make_classification_data(40)",
        "loader": {"_target_": "DataLoader", "dataset": "@data", "batch_size": 4},
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.1},
        "trainer": {
            "_target_": "monai_dp.engines.DPSupervisedTrainer", "device": "cpu", "max_epochs": 1,
            "train_data_loader": "@loader", "network": "@network", "optimizer": "@optimizer",
            "loss_function": "$torch.nn.CrossEntropyLoss()", "target_epsilon": 8.0, "target_delta": 1e-3,
            "max_grad_norm": 1.0, "accountant": "rdp",
        },
    }
    parser = ConfigParser(config, globals={"helpers": "tests.conftest"})
    trainer = parser.get_parsed_content("trainer")
    assert isinstance(trainer, DPSupervisedTrainer)
    trainer.run()
    assert 0 < trainer.get_epsilon() <= 8.0


class _RawScale(torch.nn.Module):
    """A trainable parameter outside any layer ghost clipping knows."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (self.conv(x) * self.scale).mean((2, 3))


def test_grad_sample_mode_auto_uses_ghost_where_supported_and_ghost_refuses_the_rest():
    data = make_classification_data(n=20)

    def make(net, mode):
        return DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=4),
                                   network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                   loss_function=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0,
                                   grad_sample_mode=mode)

    chosen = make(TinyClassifier(), "auto")
    assert chosen.ghost is not None and not chosen.clipper.decided
    chosen.run()
    assert chosen.clipper.decided and chosen.clipper.timings and chosen.dp_steps == 5
    assert make(TinyClassifier(), "per_sample").ghost is None
    auto = make(_RawScale(), "auto")
    assert auto.ghost is None
    auto.run()
    assert auto.dp_steps == 5
    with pytest.raises(DPIncompatibleModuleError, match=r"`<root>`: _RawScale holds trainable parameters \(scale\)"):
        make(_RawScale(), "ghost")
    with pytest.raises(ValueError, match=r"`grad_sample_mode` must be one of"):
        make(TinyClassifier(), "hooks")


def test_auto_mode_raises_when_ghost_and_per_sample_sums_disagree():
    """The first-batch comparison is a runtime guard: a wrong clipped sum stops training before any update."""
    data = make_classification_data(n=20)
    net = TinyClassifier()
    trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=8),
                                  network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                  loss_function=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0)
    real = trainer.ghost.clipped_sum
    before = [p.detach().clone() for p in net.parameters()]

    def doubled(*args, **kwargs):  # e.g. a bug that drops the clip factor of half the items
        out = real(*args, **kwargs)
        return out._replace(summed={n: 2 * g for n, g in out.summed.items()})

    trainer.ghost.clipped_sum = doubled
    with pytest.raises(RuntimeError, match=r"`clipped sum of `.*` must be the same by ghost clipping and by "
                                           r"per-sample gradients"):
        trainer.run()
    assert trainer.dp_steps == 1  # the batch was sampled: accounted, though nothing of it was applied
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_accountant_handler_computes_epsilon_per_epoch_not_per_step(monkeypatch):
    """A tight ε can cost more than a step: by default it is computed at the start, per epoch and at the end,
    while the step counters are published every iteration."""
    calls = []
    trainer = make_trainer(max_epochs=2, target_delta=1e-3, accountant="prv")
    original = type(trainer.privacy).get_epsilon

    def counting(self, delta=None):
        calls.append(self.steps)
        return original(self, delta)

    monkeypatch.setattr(type(trainer.privacy), "get_epsilon", counting)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        (e.state.dp_steps, e.state.dp_epsilon_steps)))
    trainer.run()
    assert trainer.dp_steps == 20 and [s for s, _ in seen] == list(range(1, 21))
    assert [e for _, e in seen] == [0] * 10 + [10] * 10  # ε as of the last epoch end
    assert trainer.state.metrics["epsilon"] == trainer.get_epsilon() and trainer.state.dp_epsilon_steps == 20
    assert len(calls) <= 5  # STARTED, 2 epochs, COMPLETED (+ the budget check's own, cached, computation)


def test_accountant_handler_iteration_interval():
    handler = PrivacyAccountantHandler(iteration_interval=3, epsilon_key="eps")
    trainer = make_trainer(max_epochs=1, target_delta=1e-3, handlers=[handler])
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.dp_epsilon_steps))
    trainer.run()
    assert seen == [0, 0, 3, 3, 3, 6, 6, 6, 9, 9]
    with pytest.raises(ValueError, match="iteration_interval"):
        PrivacyAccountantHandler(iteration_interval=0)
