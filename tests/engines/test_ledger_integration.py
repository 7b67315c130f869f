"""The trainer charges its runs to the privacy ledger: refused or shortened before the first step, crash-safe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers import PrivacyReportHandler
from monai_dp.privacy import Mechanism, compose_epsilon
from monai_dp.privacy.fingerprint import dataset_fingerprint
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from tests.conftest import TinyClassifier
from tests.engines.test_patient_level import _patient_data

REPO = Path(__file__).resolve().parents[2]
SIGMA, DELTA = 1.0, 1e-5


def _trainer(ledger, unit="record", handlers=(), max_epochs=1, **kw):
    torch.manual_seed(0)
    net = TinyClassifier()
    loader = DataLoader(Dataset(_patient_data()), batch_size=4 if unit == "record" else 3)
    return DPSupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=net,
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=nn.CrossEntropyLoss(),
                               noise_multiplier=SIGMA, target_delta=DELTA, privacy_unit=unit, ledger=ledger,
                               train_handlers=list(handlers), **kw)


def test_default_dataset_id_is_the_fingerprint(tmp_path):
    trainer = _trainer(None)
    assert trainer.privacy.dataset_id == dataset_fingerprint(_patient_data(), keys=("patient_id", "image", "label"))
    assert trainer.privacy.dataset_id.startswith("sha256:")


def test_second_run_is_shortened_then_refused(tmp_path):
    path = tmp_path / "ledger.db"
    one_run = compose_epsilon([Mechanism(SIGMA, 0.1, 10)], DELTA)  # 1 epoch = 10 steps at q = 4/40
    budget = compose_epsilon([Mechanism(SIGMA, 0.1, 16)], DELTA)  # room for 16 steps in all
    ds = _trainer(None).privacy.dataset_id
    PrivacyLedger(path).init_dataset(ds, epsilon=budget, delta=DELTA)

    first = _trainer(str(path))
    first.run()
    assert first.dp_steps == 10
    assert PrivacyLedger(path).spent(ds).epsilon == pytest.approx(one_run, abs=1e-9)

    second = _trainer(str(path))
    second.run()
    assert second.dp_steps == 6, "shortened to what is left of the budget"
    assert second.state.dp_budget_exhausted
    assert PrivacyLedger(path).spent(ds).epsilon == pytest.approx(budget, abs=1e-9)
    assert [(r["status"], r["steps_taken"]) for r in PrivacyLedger(path).spent(ds).runs] == [("finished", 10),
                                                                                              ("stopped", 6)]

    third = _trainer(str(path))
    with pytest.raises(PrivacyBudgetExhaustedError) as err:
        third.run()
    msg = str(err.value)
    assert ds in msg and f"{budget:.4g}"[:4] in msg
    assert third.dp_steps == 0, "refused before the first step"


def test_report_has_ledger_totals(tmp_path):
    path = tmp_path / "ledger.db"
    trainer = _trainer(str(path), handlers=[PrivacyReportHandler(str(tmp_path / "report.json"))])
    PrivacyLedger(path).init_dataset(trainer.privacy.dataset_id, epsilon=50.0, delta=DELTA)
    trainer.run()
    led = json.loads((tmp_path / "report.json").read_text())["ledger"]
    assert led["spent_before"] == 0.0
    assert led["spent_after"] == pytest.approx(trainer.get_epsilon(), abs=0.05)  # PLD ledger vs PRV trainer
    assert led["budget_epsilon"] == 50.0 and led["status"] == "finished" and led["steps"] == 10


def test_record_level_run_is_charged_its_patient_level_cost(tmp_path):
    path = tmp_path / "ledger.db"
    trainer = _trainer(str(path))
    ds = trainer.privacy.dataset_id
    PrivacyLedger(path).init_dataset(ds, epsilon=500.0, delta=DELTA, unit="patient")
    trainer.run()
    spent = PrivacyLedger(path).spent(ds).epsilon
    assert spent == pytest.approx(compose_epsilon([Mechanism(SIGMA, 0.1, 10, 5)], DELTA), rel=1e-6)
    assert spent > 2 * trainer.get_epsilon()


def test_unknown_dataset_names_the_init_command(tmp_path):
    trainer = _trainer(str(tmp_path / "ledger.db"))
    with pytest.raises(Exception, match=r"monai-dp ledger init"):
        trainer.run()


def test_a_crash_mid_run_counts_the_steps_taken(tmp_path):
    path = tmp_path / "ledger.db"
    ds = _trainer(None).privacy.dataset_id
    PrivacyLedger(path).init_dataset(ds, epsilon=100.0, delta=DELTA)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from ignite.engine import Events
        from tests.engines.test_ledger_integration import _trainer
        trainer = _trainer({str(path)!r})
        @trainer.on(Events.ITERATION_COMPLETED(once=4))
        def crash(engine):
            os._exit(1)
        trainer.run()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    ledger = PrivacyLedger(path)
    ledger.recover()
    (run,) = ledger.spent(ds).runs
    assert run["status"] == "interrupted" and run["steps_taken"] == 4
    assert ledger.spent(ds).epsilon == pytest.approx(compose_epsilon([Mechanism(SIGMA, 0.1, 4)], DELTA), abs=1e-9)
