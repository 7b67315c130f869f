"""A model's privacy history travels with its weights: a retrain from a DP model file composes, as MONAI Label
retrains a bundle (a ``CheckpointLoader`` of ``model.pt`` with ``load_dict={"model": network}`` inserted first)."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from monai.handlers import CheckpointLoader
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.engines.history import PrivacyHistory
from monai_dp.handlers import PrivacyReportHandler
from monai_dp.handlers.privacy_report_handler import report_markdown
from monai_dp.privacy.accountants import create_accountant
from monai_dp.utils.errors import DPConfigurationError
from tests.conftest import TinyClassifier, make_classification_data

SIGMA, DELTA, Q = 1.0, 1e-3, 0.2  # 40 records, batch 8: 5 steps an epoch


def _trainer(handlers=(), seed=0, max_epochs=1, **kw):
    torch.manual_seed(seed)
    net = TinyClassifier()
    loader = DataLoader(make_classification_data(n=40), batch_size=8)
    return DPSupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=net,
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
                               noise_multiplier=SIGMA, target_delta=DELTA, train_handlers=list(handlers), **kw)


def _save_model(trainer, path, privacy=True):
    """What a bundle's model.pt holds: the weights, and their accounting beside them."""
    content = {"model": trainer.network.state_dict()}
    if privacy:
        content["privacy"] = PrivacyHistory(trainer.network).state_dict()
    torch.save(content, path)


def _retrain(path, **kw):
    """A fresh trainer of another initialisation, with MONAI Label's loader of ``path`` inserted first."""
    holder = {}

    def handlers(net):
        loader = CheckpointLoader(load_path=str(path), load_dict={"model": net}, strict=False)
        holder["loader"] = loader
        return loader

    torch.manual_seed(1)
    net = TinyClassifier()
    loader = DataLoader(make_classification_data(n=40), batch_size=8)
    return DPSupervisedTrainer(device="cpu", max_epochs=kw.pop("max_epochs", 1), train_data_loader=loader, network=net,
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
                               noise_multiplier=SIGMA, target_delta=DELTA,
                               train_handlers=[handlers(net), *kw.pop("handlers", [])], **kw)


def _epsilon_of(steps):
    acc = create_accountant("prv")
    acc.step(SIGMA, Q, steps)
    return acc.get_epsilon(DELTA)


def test_model_file_with_its_accounting_still_loads_everywhere(tmp_path):
    first = _trainer()
    first.run()
    _save_model(first, tmp_path / "model.pt")
    content = torch.load(tmp_path / "model.pt", weights_only=True)  # MONAI's CheckpointLoader, MONAI Label
    assert set(content) == {"model", "privacy"}
    net = TinyClassifier()
    from monai_dp.networks import make_private_compatible

    make_private_compatible(net)
    net.load_state_dict(content.get("model", content), strict=True)  # MONAI Label's inferer: checkpoint.get("model")
    from ignite.handlers import Checkpoint

    Checkpoint.load_objects(to_load={"model": net}, checkpoint=str(tmp_path / "model.pt"))  # ckpt_export's way
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), first.network.state_dict().values()))
    assert sum(n for *_, n in content["privacy"]["accountant"]["history"]) == first.dp_steps == 5


def test_retrain_from_a_dp_model_file_composes(tmp_path):
    first = _trainer()
    first.run()
    _save_model(first, tmp_path / "model.pt")
    report = PrivacyReportHandler(str(tmp_path / "report.json"))
    second = _retrain(tmp_path / "model.pt", privacy_history=str(tmp_path), handlers=[report])
    second.run()
    assert second.dp_steps == 10, "the 5 steps behind the loaded weights, then 5 of its own"
    assert second.privacy.prior_steps == 5 and second.privacy.prior[0]["source"].endswith("model.pt")
    eps = second.get_epsilon()
    assert eps == pytest.approx(_epsilon_of(10), rel=1e-9), "the same accountant over the concatenated history"
    assert eps > first.get_epsilon() * 1.2
    dp_accounting = pytest.importorskip("dp_accounting")
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA)), 10)
    assert eps == pytest.approx(pld.get_epsilon(DELTA), rel=0.03)
    assert report.last_report["epsilon"] == eps and report.last_report["steps"] == 10
    assert report.last_report["prior"][0]["steps"] == 5
    assert "| continues from | 5 earlier steps behind the loaded weights" in report_markdown(report.last_report)


def test_a_third_run_composes_all_three(tmp_path):
    first = _trainer()
    first.run()
    _save_model(first, tmp_path / "model.pt")
    second = _retrain(tmp_path / "model.pt", privacy_history=str(tmp_path / "model.pt"))
    second.run()
    _save_model(second, tmp_path / "model.pt")
    third = _retrain(tmp_path / "model.pt", privacy_history=[str(tmp_path / "model.pt")])
    third.run()
    assert third.dp_steps == 15 and third.get_epsilon() == pytest.approx(_epsilon_of(15), rel=1e-9)
    assert [p["steps"] for p in third.privacy.prior] == [5, 10]


def test_history_loaded_with_the_weights_composes_without_privacy_history(tmp_path):
    first = _trainer()
    first.run()
    _save_model(first, tmp_path / "model.pt")
    torch.manual_seed(1)
    second = _trainer(seed=1)
    CheckpointLoader(str(tmp_path / "model.pt"), {"model": second.network,
                                                  "privacy": PrivacyHistory(second.network)}).attach(second)
    second.run()
    assert second.dp_steps == 10 and second.get_epsilon() == pytest.approx(_epsilon_of(10), rel=1e-9)


def test_loaded_weights_without_a_history_are_refused(tmp_path):
    first = _trainer()
    first.run()
    _save_model(first, tmp_path / "model.pt", privacy=False)  # a plain state dict in a dict: no accounting
    report = PrivacyReportHandler(str(tmp_path / "report.json"))
    second = _retrain(tmp_path / "model.pt", privacy_history=str(tmp_path), handlers=[report])
    with pytest.raises(DPConfigurationError, match=r"`network` must be the weights the trainer was built with.*"
                                                   r"no history found \(looked in .*model\.pt\).*initial_weights='public'"):
        second.run()
    assert second.dp_steps == 0, "refused before its first step"
    assert not (tmp_path / "report.json").exists(), "a refused run does not replace the model's report"


def test_a_history_of_other_weights_is_not_taken(tmp_path):
    first = _trainer()
    first.run()
    _save_model(first, tmp_path / "model.pt")
    torch.save(first.network.state_dict(), tmp_path / "other.pt")
    with torch.no_grad():  # the weights MONAI Label loads are not those the history was saved with
        next(first.network.parameters()).add_(1.0)
    torch.save(first.network.state_dict(), tmp_path / "changed.pt")
    second = _retrain(tmp_path / "changed.pt", privacy_history=str(tmp_path))
    with pytest.raises(DPConfigurationError, match="no history found"):
        second.run()


def test_public_initial_weights_are_a_declared_choice(tmp_path, caplog):
    first = _trainer()
    first.run()
    torch.save(first.network.state_dict(), tmp_path / "pretrained.pt")
    second = _retrain(tmp_path / "pretrained.pt", initial_weights="public")
    with caplog.at_level("WARNING"):
        second.run()
    assert second.dp_steps == 5 and second.get_epsilon() == pytest.approx(_epsilon_of(5), rel=1e-9)
    assert "initial_weights='public'" in caplog.text
    assert second.privacy.prior == [{"source": "initial_weights='public'", "steps": 0,
                                     "model_digest": second.privacy.prior[0]["model_digest"]}]
    with pytest.raises(ValueError, match=r"`initial_weights` must be one of .*'public'.*got 'trusted'"):
        _trainer(initial_weights="trusted")


def test_weights_loaded_before_construction_are_the_starting_point(tmp_path):
    first = _trainer()
    first.run()
    torch.manual_seed(1)
    net = TinyClassifier()
    from monai_dp.networks import make_private_compatible

    make_private_compatible(net)
    net.load_state_dict(first.network.state_dict())
    second = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(make_classification_data(n=40),
                                 batch_size=8), network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                 loss_function=nn.CrossEntropyLoss(), noise_multiplier=SIGMA, target_delta=DELTA)
    second.run()
    assert second.dp_steps == 5 and second.privacy.prior == []


def test_resuming_a_trainer_checkpoint_is_not_counted_twice(tmp_path):
    from monai.handlers import CheckpointSaver

    first = _trainer(max_epochs=1)
    CheckpointSaver(str(tmp_path), {"trainer": first, "model": first.network, "optimizer": first.optimizer},
                    save_final=True, final_filename="ckpt.pt").attach(first)
    first.run()
    resumed = _trainer(seed=1, max_epochs=2)
    CheckpointLoader(str(tmp_path / "ckpt.pt"), {"trainer": resumed, "model": resumed.network,
                                                 "optimizer": resumed.optimizer}).attach(resumed)
    resumed.run()
    assert resumed.dp_steps == 10 and resumed.privacy.prior == []
