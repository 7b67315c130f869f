"""PrivacyReportHandler and the privacy report: JSON + markdown, metadata, patient information, and the
patient-level guarantee of record-level runs."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader, Dataset
from ignite.engine import Events
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers import PrivacyReportHandler, report_markdown
from monai_dp.privacy import group_privacy_epsilon, patient_level_epsilon
from tests.conftest import TinyClassifier
from tests.engines.test_patient_level import _patient_data
from tests.engines.test_trainer import make_trainer


def _run(unit: str, tmp_path, **kw):
    torch.manual_seed(0)
    net = TinyClassifier()
    handler = PrivacyReportHandler(report_file=str(tmp_path / "models" / "privacy_report.json"))
    trainer = DPSupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(Dataset(_patient_data()),
                                  batch_size=4 if unit == "record" else 3), network=net,
                                  optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                  loss_function=nn.CrossEntropyLoss(), noise_multiplier=1.0, privacy_unit=unit,
                                  train_handlers=[handler], **kw)
    trainer.run()
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    md = (tmp_path / "models" / "privacy_report.md").read_text()
    return trainer, report, md


def test_record_level_report_states_the_weaker_patient_guarantee(tmp_path):
    trainer, report, md = _run("record", tmp_path)
    assert report["unit"] == "record" and report["num_units"] == 40
    assert report["patients"]["num_patients"] == 12 and report["patients"]["max"] == 5
    pl = report["patient_level"]
    q, steps = trainer.privacy.sample_rate, trainer.dp_steps
    assert pl["records_per_patient"] == 5
    assert pl["epsilon"] == pytest.approx(patient_level_epsilon(1.0, q, steps, 5, report["delta"]), rel=1e-9)
    assert pl["epsilon"] > report["epsilon"]
    loose = group_privacy_epsilon(1.0, q, steps, 5, report["delta"])
    assert pl["epsilon_group_privacy_formula"] == (pytest.approx(loose) if loose != float("inf") else "inf")
    assert "record-level guarantee" in md and "5 records" in md


def test_patient_level_report(tmp_path):
    trainer, report, md = _run("patient", tmp_path)
    assert report["unit"] == "patient" and report["num_units"] == 12
    assert report["patient_level"] is None
    assert report["patients"]["histogram"] == {"1": 2, "2": 2, "3": 2, "4": 2, "5": 4}
    assert report["epsilon"] == pytest.approx(trainer.get_epsilon())
    assert "patient-level DP-SGD" in md and "12" in md


def test_report_handler_writes_report_and_metadata_keeping_other_keys(tmp_path):
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0", "privacy": {"unit": "record", "note": "kept"}}))
    handler = PrivacyReportHandler(report_file=str(tmp_path / "models" / "report.json"), meta_file=str(meta))
    trainer = make_trainer(target_delta=1e-3, handlers=[handler])
    trainer.run()
    report = json.loads((tmp_path / "models" / "report.json").read_text())
    assert report["steps"] == trainer.dp_steps > 0 and report["epsilon"] == trainer.get_epsilon() > 0
    assert report["noise_multiplier"] == 1.0 and report["sample_rate"] == pytest.approx(0.1)
    saved = json.loads(meta.read_text())
    assert saved["version"] == "0.1.0" and saved["privacy"]["note"] == "kept"
    assert saved["privacy"]["epsilon"] == report["epsilon"]
    assert handler.last_report["epsilon"] == report["epsilon"]


def test_report_handler_writes_on_failure_and_reraises(tmp_path):
    handler = PrivacyReportHandler(report_file=str(tmp_path / "report.json"))
    trainer = make_trainer(target_delta=1e-3, handlers=[handler])

    @trainer.on(Events.ITERATION_COMPLETED(once=3))
    def _boom(engine):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 3


def test_markdown_states_epsilon_delta_steps_and_a_seeded_run():
    report = {"unit": "record", "epsilon": 1.23456, "delta": 1e-5, "steps": 17, "accountant": "prv",
              "noise_multiplier": 1.1, "history": [[1.1, 0.1, 17]], "max_grad_norm": 0.5, "sample_rate": 0.1,
              "sampling": "poisson", "num_units": 40, "target_epsilon": 2.0, "budget_exhausted": False,
              "randomness": {"source": "given seeds", "secure_mode": False, "warning": "SEEDED"}}
    md = report_markdown(report)
    assert "(ε, δ) = (1.235, 1e-05)" in md and "after 17 steps (PRV accountant)" in md
    assert "**SEEDED**" in md and "| clip norm C | 0.5 |" in md
