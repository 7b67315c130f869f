"""The privacy report: JSON + markdown, patient information, and the patient-level guarantee of record-level runs."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_dp.engines import DPSupervisedTrainer
from monai_dp.handlers import PrivacyReportHandler
from monai_dp.privacy import group_privacy_epsilon, patient_level_epsilon
from tests.conftest import TinyClassifier
from tests.engines.test_patient_level import _patient_data


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
