"""`monai-dp audit` end to end on CPU, and flags against the DP bound."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from monai_dp.audit.bounds import tradeoff_curve
from monai_dp.audit.report import analyse
from monai_dp.cli import audit as audit_cli
from monai_dp.cli import main
from monai_dp.privacy import Mechanism


def test_cli_writes_the_report_folder(tmp_path, capsys):
    out = tmp_path / "audit"
    rc = main(["audit", "--out", str(out), "--synthetic", "--num-patients", "30", "--num-models", "4", "--epochs", "2",
               "--noise-multiplier", "1.0", "--privacy-unit", "patient", "--batch-size", "8", "--max-records", "3",
               "--width", "16", "--lr", "0.5", "--momentum", "0"])  # this test's recipe (small and fast)
    assert rc == 0
    for name in ("report.md", "report.html", "records.csv", "patients.csv", "summary.json",
                 "patient_auc_survival.png", "aggregate_roc.png", "subgroup_group.png", "model_0003.npz"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit"] == "patient" and summary["num_models"] == 4
    # the bound is that of the mechanism the models were really trained with: sigma as given, patients as units
    mechanisms = [Mechanism(*m) for m in summary["bound"]["mechanisms"]]
    assert mechanisms and all(m.noise_multiplier == 1.0 and 0 < m.sample_rate < 1 and m.group_size == 1
                              for m in mechanisms)
    assert summary["bound"]["auc"] == pytest.approx(tradeoff_curve(mechanisms).auc_bound())
    with open(out / "patients.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["num_patients"] and {"patient_id", "auc", "above_bound",
                                                     "significantly_above_bound"} <= set(rows[0])
    assert max(int(r["num_records"]) for r in rows) <= 3 < summary["num_records"]
    assert summary["num_records"] == sum(int(r["num_records"]) for r in rows)
    assert summary["patients_above_bound"] == sum(int(r["above_bound"]) for r in rows)
    assert summary["patients_significantly_above_bound"] == sum(int(r["significantly_above_bound"]) for r in rows)
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
               *(arg for o in over for arg in ("--override", o))])
    assert rc == 0
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["num_models"] == 4 and summary["unit"] == "record" and summary["bound"]["auc"] > 0.5
    # the overrides reached the bundle: its synthetic data was written where told, with the number of items told
    datalist = json.loads((tmp_path / "syn" / "dataset.json").read_text())
    assert len(datalist["training"]) + len(datalist["test"]) == 40
    assert summary["num_records"] < len(datalist["training"]), "the training split, without its validation part"
    assert summary["num_patients"] < summary["num_records"], "synthetic bundle data has two records per patient"


def test_self_audit_passes_on_the_real_trainer_and_writes_its_report(tmp_path, capsys):
    rc = main(["audit", "--self-audit", "--out", str(tmp_path), "--num-models", "40", "--steps", "2",
               "--noise-multiplier", "2.0"])
    text = capsys.readouterr().out
    assert rc == 0 and "All checks passed." in text
    res = json.loads((tmp_path / "self_audit.json").read_text())
    assert res["passed"] and res["mu_claimed"] == pytest.approx(math.sqrt(2) / 2.0)
    assert res["runs_per_side"] == 40 and res["steps"] == 2 and res["noise_multiplier"] == 2.0
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


# -- the CLI's wiring, without training: flags -> recipe, run_lira, report ----------------------------------------
def _args(*argv: str):
    return audit_cli._parser().parse_args(["--out", "unused", "--synthetic", *argv])


def _data(num_patients: int = 6) -> dict:
    pids = np.repeat([f"p{i}" for i in range(num_patients)], 2)
    return {"images": np.zeros((len(pids), 1, 4, 4), np.float32), "labels": np.arange(len(pids)) % 3,
            "patient_ids": pids}


def test_override_values_are_read_as_json_or_kept_as_text():
    assert audit_cli.parse_overrides(["max_epochs=5", 'dataset_dir="/data/x"', "image_size=[32, 32]",
                                      "name=plain text", "expr=a=b"]) == {
        "max_epochs": 5, "dataset_dir": "/data/x", "image_size": [32, 32], "name": "plain text", "expr": "a=b"}


def test_flags_make_the_recipe():
    recipe = audit_cli.array_recipe(_args("--epochs", "3", "--batch-size", "5", "--lr", "0.1", "--momentum", "0.9",
                                          "--width", "8", "--noise-multiplier", "1.5", "--max-grad-norm", "2",
                                          "--privacy-unit", "patient"), _data())
    assert (recipe.epochs, recipe.batch_size, recipe.learning_rate, recipe.momentum, recipe.width) == (3, 5, 0.1,
                                                                                                      0.9, 8)
    assert recipe.dp and recipe.num_classes == 3
    assert recipe.dp_kwargs == {"noise_multiplier": 1.5, "max_grad_norm": 2.0, "privacy_unit": "patient"}
    targeted = audit_cli.array_recipe(_args("--target-epsilon", "4"), _data())
    assert targeted.dp_kwargs == {"target_epsilon": 4.0, "max_grad_norm": 1.0, "privacy_unit": "record"}
    assert not audit_cli.array_recipe(_args("--no-dp"), _data()).dp


@pytest.fixture
def fake_lira(monkeypatch):
    """``run_lira`` replaced by one that records its call and returns scores with a known history."""
    from monai_dp.audit import lira

    calls = []

    def run_lira(recipe, labels, patient_ids, out, num_models, workers, seed):
        calls.append({"recipe": recipe, "num_models": num_models, "workers": workers, "seed": seed})
        rng = np.random.default_rng(0)
        patient = np.unique(patient_ids, return_inverse=True)[1]
        member = (np.arange(num_models)[:, None] + patient[None]) % 2 == 0  # each patient in half of the models
        history = [] if not recipe.dp else [(2.0, 0.25, 7)]
        return {"scores": rng.normal(size=member.shape), "member": member, "histories": [history] * num_models}

    monkeypatch.setattr(lira, "run_lira", run_lira)
    monkeypatch.setattr(audit_cli, "_load", lambda args: _data(8))
    return calls


def test_the_bound_comes_from_the_history_of_the_trained_models(tmp_path, fake_lira, capsys):
    rc = main(["audit", "--out", str(tmp_path), "--synthetic", "--num-models", "6", "--workers", "3", "--seed", "5",
               "--noise-multiplier", "2", "--privacy-unit", "patient"])
    assert rc == 0
    assert [(c["num_models"], c["workers"], c["seed"]) for c in fake_lira] == [(6, 3, 5)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["unit"] == "patient" and summary["bound"]["mechanisms"] == [[2.0, 0.25, 7, 1]]
    assert summary["bound"]["auc"] == pytest.approx(tradeoff_curve([Mechanism(2.0, 0.25, 7)]).auc_bound())
    assert capsys.readouterr().out == (tmp_path / "report.md").read_text() + "\n"


def test_no_dp_audit_has_no_bound(tmp_path, fake_lira, capsys):
    assert main(["audit", "--out", str(tmp_path), "--synthetic", "--num-models", "4", "--no-dp"]) == 0
    assert not fake_lira[0]["recipe"].dp
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["unit"] == "none (no DP)" and summary["bound"] is None
    assert summary["patients_above_bound"] is None


@pytest.mark.parametrize("passed", [True, False])
def test_self_audit_exit_code_says_whether_it_passed(tmp_path, monkeypatch, capsys, passed):
    from monai_dp.audit import self_audit

    calls = []

    def fake(out, runs, steps, seed, noise_multiplier):
        calls.append((runs, steps, seed, noise_multiplier))
        (tmp_path / "self_audit.md").write_text("verdict\n")
        return {"passed": passed}

    monkeypatch.setattr(self_audit, "run_self_audit", fake)
    rc = main(["audit", "--self-audit", "--out", str(tmp_path), "--num-models", "7", "--steps", "3", "--seed", "2"])
    assert rc == (0 if passed else 1)
    assert calls == [(7, 3, 2, 1.0)]  # sigma defaults to 1 for the self-audit
    assert "verdict" in capsys.readouterr().out
