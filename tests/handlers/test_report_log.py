"""The privacy report says what it computes before it does (the patient-level guarantee can take a while)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from monai_dp.handlers import privacy_report_handler as module


@pytest.mark.parametrize(("unit", "patients", "extra"), [
    ("record", {"max": 5}, (" and the guarantee it implies for a patient with 5 records (a PLD composition, the slow "
                            "part)")),
    ("patient", {"max": 5}, ""),
    ("record", None, ""),
])
def test_the_report_announces_what_it_computes_before_computing_it(unit, patients, extra, tmp_path, caplog,
                                                                    monkeypatch):
    order = []
    monkeypatch.setattr(module, "privacy_report", lambda engine: order.append("computed") or {
        "epsilon": 1.0, "delta": 1e-5, "steps": 3})
    monkeypatch.setattr(module, "report_markdown", lambda report: "")
    monkeypatch.setattr(module.logger, "info", lambda msg, *args: order.append(msg % args))
    engine = SimpleNamespace(privacy=SimpleNamespace(unit=unit, patients=patients, steps=3))
    module.PrivacyReportHandler(str(tmp_path / "report.json")).write(engine)
    assert order[:2] == [f"Writing the privacy report: ε after 3 steps{extra}.", "computed"]
