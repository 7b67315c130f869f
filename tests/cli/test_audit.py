"""`monai-dp audit` end to end on CPU, and flags against the DP bound."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from monai_dp.cli import main
from monai_dp.audit.report import analyse
from monai_dp.privacy import Mechanism


def test_cli_writes_the_report_folder(tmp_path, capsys):
    out = tmp_path / "audit"
    rc = main(["audit", "--out", str(out), "--synthetic", "--num-patients", "30", "--num-models", "4", "--epochs", "2",
               "--noise-multiplier", "1.0", "--privacy-unit", "patient", "--batch-size", "8", "--max-records", "3"])
    assert rc == 0
    for name in ("report.md", "report.html", "records.csv", "patients.csv", "summary.json",
                 "patient_auc_survival.png", "aggregate_roc.png", "subgroup_group.png", "model_0003.npz"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit"] == "patient" and summary["num_models"] == 4
    assert 0.5 < summary["bound"]["auc"] < 1.0
    rows = list(csv.DictReader(open(out / "patients.csv")))
    assert len(rows) == summary["num_patients"] and {"patient_id", "auc", "above_bound",
                                                     "significantly_above_bound"} <= set(rows[0])
    assert max(int(r["num_records"]) for r in rows) <= 3 < summary["num_records"]
    assert summary["patients_significantly_above_bound"] is not None
    assert "Privacy audit (patient-level training)" in capsys.readouterr().out


def test_bad_npz_is_named(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 1, 4, 4)))
    assert main(["audit", "--out", str(tmp_path / "a"), "--npz", str(tmp_path / "d.npz")]) == 2
    assert "missing ['labels', 'patient_ids']" in capsys.readouterr().err


def test_patients_above_the_bound_are_flagged():
    rng = np.random.default_rng(0)
    member = np.zeros((200, 6), bool)
    member[:100] = True
    member = rng.permuted(member, axis=0)
    scores = rng.normal(size=(200, 6)) + member * np.array([0, 0, 0, 0, 0, 6.0])  # record 5 leaks badly
    res = analyse(scores, member, ["a", "a", "b", "c", "d", "e"], [Mechanism(4.0, 0.01, 100)], unit="patient")
    assert res["bound"]["auc"] < 0.6
    assert res["record_flag"].tolist() == [False] * 5 + [True]
    assert res["patient_flag"].tolist() == [False, False, False, False, True]
    assert res["patient_significant"].tolist() == [False, False, False, False, True]


@pytest.mark.slow
@pytest.mark.bundle
def test_cli_audits_a_bundle_recipe(tmp_path):
    import shutil
    from pathlib import Path

    root = tmp_path / "dp_classification_2d"
    shutil.copytree(Path(__file__).resolve().parents[2] / "bundles" / "dp_classification_2d", root)
    over = ["synthetic_items=40", "synthetic_size=32", "image_size=[32, 32]", "batch_size=8", "max_epochs=1",
            f'synthetic_dir="{tmp_path / "syn"}"']
    rc = main(["audit", "--out", str(tmp_path / "audit"), "--bundle", str(root), "--num-models", "4",
               *sum((["--override", o] for o in over), [])])
    assert rc == 0
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["num_models"] == 4 and summary["unit"] == "record" and summary["bound"]["auc"] > 0.5
    assert summary["num_patients"] < summary["num_records"], "synthetic bundle data has two records per patient"


def test_self_audit_passes_on_the_real_trainer_and_writes_its_report(tmp_path, capsys):
    rc = main(["audit", "--self-audit", "--out", str(tmp_path), "--num-models", "40", "--steps", "2",
               "--noise-multiplier", "2.0"])
    text = capsys.readouterr().out
    assert rc == 0 and "All checks passed." in text
    res = json.loads((tmp_path / "self_audit.json").read_text())
    assert res["passed"] and res["mu_claimed"] == pytest.approx(math.sqrt(2) / 2.0)
    assert res["one_run"]["epsilon_lower"] <= res["claimed_epsilon"]


def test_self_audit_fails_loudly_when_the_noise_is_halved(tmp_path, monkeypatch):
    from monai_dp.audit import canary, one_run
    from monai_dp.audit.self_audit import run_self_audit

    def halve(trainer):
        trainer.optimizer.noise_multiplier /= 2

    real_scores, real_one = canary.dirac_canary_scores, one_run.dirac_one_run_audit
    monkeypatch.setattr(canary, "dirac_canary_scores", lambda *a, **k: real_scores(*a, mutate=halve, **k))
    monkeypatch.setattr(one_run, "dirac_one_run_audit", lambda *a, **k: real_one(*a, mutate=halve, **k))
    res = run_self_audit(tmp_path, runs=60, steps=2, noise_multiplier=2.0)
    assert not res["passed"]
    assert "A check failed" in (tmp_path / "self_audit.md").read_text()
