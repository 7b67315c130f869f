"""A ledger kept by default (bundles): created on first use, the dataset registered with the run's target ε; the
next runs on the same data compose with it, and are refused once it is spent."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.privacy import Mechanism, compose_epsilon
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from tests.conftest import TinyClassifier, make_classification_data

SIGMA, DELTA, Q = 1.0, 1e-3, 0.2  # 40 records, batch 8: 5 steps an epoch
# room for 8 steps on the dataset (half way to the 9th, clear of the accountants' rounding)
BUDGET = (compose_epsilon([Mechanism(SIGMA, Q, 8)], DELTA) + compose_epsilon([Mechanism(SIGMA, Q, 9)], DELTA)) / 2


def _trainer(ledger, target_epsilon=BUDGET, **kw):
    torch.manual_seed(0)
    net = TinyClassifier()
    loader = DataLoader(Dataset(make_classification_data(n=40)), batch_size=8)
    return DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net,
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
                               noise_multiplier=SIGMA, target_delta=DELTA, target_epsilon=target_epsilon, ledger=ledger,
                               **kw)


def test_first_use_registers_then_runs_compose_then_are_refused(tmp_path):
    path = tmp_path / "models" / "privacy_ledger.db"
    first = _trainer(str(path), register_dataset=True)
    first.run()
    ledger = PrivacyLedger(path, create=False)
    ds = first.privacy.dataset_id
    assert ledger.dataset_ids() == [ds]
    assert ledger.budget(ds) == (BUDGET, DELTA) and ledger.dataset_unit(ds) == "record"
    assert first.dp_steps == 5

    second = _trainer(str(path), register_dataset=True, target_epsilon=2 * BUDGET)  # a later target moves nothing
    second.run()
    assert second.dp_steps == 3, "shortened to the 8 steps the registered budget allows"
    assert ledger.budget(ds) == (BUDGET, DELTA)
    spent = ledger.spent(ds).epsilon
    assert spent == pytest.approx(compose_epsilon([Mechanism(SIGMA, Q, 8)], DELTA), rel=1e-6)
    assert spent > compose_epsilon([Mechanism(SIGMA, Q, 5)], DELTA) * 1.1, "the runs compose, not the last alone"

    third = _trainer(str(path), register_dataset=True)
    with pytest.raises(PrivacyBudgetExhaustedError):
        third.run()
    assert third.dp_steps == 0


def test_without_register_a_missing_ledger_is_not_created(tmp_path):
    trainer = _trainer(str(tmp_path / "privacy_ledger.db"))
    with pytest.raises(Exception, match="ledger"):
        trainer.run()
    assert not (tmp_path / "privacy_ledger.db").exists()


def test_registering_needs_a_target_epsilon(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(str(tmp_path / "l.db"), register_dataset=True, target_epsilon=None)
    with pytest.raises(ValueError, match=r"`target_epsilon` must be given to register a dataset in the ledger on "
                                         r"first use, got None\. Give `target_epsilon`"):
        trainer.run()
    assert trainer.dp_steps == 0
