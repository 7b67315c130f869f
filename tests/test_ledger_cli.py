"""``monai-dp ledger``: init, show, export, check and fingerprint through the package's command line."""

from __future__ import annotations

import json

import pytest

from monai_dp.__main__ import main
from monai_dp.privacy.fingerprint import dataset_fingerprint
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.privacy.pld import Mechanism, compose_epsilon

DELTA = 1e-5


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["ledger", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ledger_path(tmp_path, capsys):
    path = tmp_path / "ledger.db"
    code, out, _ = run_cli(capsys, "init", "--ledger", path, "--dataset-id", "ct-2024", "--epsilon", 1.0,
                           "--delta", DELTA, "--description", "abdominal CT")
    assert code == 0 and "Dataset 'ct-2024' registered" in out
    return path


def record_run(path, steps: int, planned: int | None = None) -> None:
    with PrivacyLedger(path) as led, led.begin_run("ct-2024", 2.0, 0.1, 1.0, planned or steps, note="unet") as run:
        for _ in range(min(steps, run.allowed_steps)):
            run.claim_step()


def test_init_again_and_with_another_budget(capsys, ledger_path):
    code, out, _ = run_cli(capsys, "init", "--ledger", ledger_path, "--dataset-id", "ct-2024", "--epsilon", 1.0,
                           "--delta", DELTA)
    assert code == 0 and "already registered (nothing changed)" in out
    code, _, err = run_cli(capsys, "init", "--ledger", ledger_path, "--dataset-id", "ct-2024", "--epsilon", 2.0,
                           "--delta", DELTA)
    assert code == 2 and "budget recorded for dataset 'ct-2024'" in err
    code, _, err = run_cli(capsys, "init", "--ledger", ledger_path, "--dataset-id", "x", "--epsilon", -1,
                           "--delta", DELTA)
    assert code == 2 and "`epsilon` must be a finite number > 0, got -1.0" in err


def test_show_names_dataset_budget_spent_and_runs(capsys, ledger_path):
    code, out, _ = run_cli(capsys, "show", "--ledger", ledger_path)
    assert code == 0 and "ct-2024" in out and "budget ε = 1, δ = 1e-05" in out and "No runs yet." in out
    record_run(ledger_path, 4)
    code, out, _ = run_cli(capsys, "show", "--ledger", ledger_path, "--dataset-id", "ct-2024")
    spent = compose_epsilon([Mechanism(2.0, 0.1, 4)], DELTA)
    assert code == 0 and f"Spent: ε = {spent:.4g} of 1" in out and "abdominal CT" in out
    row = next(line for line in out.splitlines() if line.startswith("1 "))
    assert row.split()[:2] == ["1", "finished"] and "unet" in row


def test_export_json_and_markdown(capsys, ledger_path, tmp_path):
    record_run(ledger_path, 3, planned=5)
    code, out, _ = run_cli(capsys, "export", "--ledger", ledger_path)
    assert code == 0
    data = json.loads(out)
    (ds,) = data["datasets"]
    assert (ds["dataset_id"], ds["budget_epsilon"], ds["budget_delta"]) == ("ct-2024", 1.0, DELTA)
    assert ds["spent_epsilon"] == pytest.approx(compose_epsilon([Mechanism(2.0, 0.1, 3)], DELTA))
    assert [(r["run_id"], r["status"], r["steps_taken"], r["reserved_steps"]) for r in ds["runs"]] == [
        (1, "finished", 3, 5)]
    target = tmp_path / "account.md"
    code, out, _ = run_cli(capsys, "export", "--ledger", ledger_path, "--format", "markdown", "--output", target)
    assert code == 0 and out == ""
    text = target.read_text()
    assert text.startswith("# Privacy ledger") and "## Dataset ct-2024" in text and "| 1 | finished |" in text


def test_check_exit_codes(capsys, ledger_path):
    code, out, _ = run_cli(capsys, "check", "--ledger", ledger_path, "--dataset-id", "ct-2024",
                           "--noise-multiplier", 2.0, "--sample-rate", 0.1, "--steps", 5)
    assert code == 0 and out.startswith("all 5 of 5 steps fit")
    record_run(ledger_path, 40)  # shortened by the ledger to what fits, then all of it taken
    code, out, err = run_cli(capsys, "check", "--ledger", ledger_path, "--dataset-id", "ct-2024",
                             "--noise-multiplier", 2.0, "--sample-rate", 0.1, "--steps", 5)
    assert code == 3 and out == ""
    assert "Privacy budget of dataset 'ct-2024'" in err and "is exhausted" in err and "run 1: finished" in err


def test_errors_exit_2_with_the_fix(capsys, tmp_path, ledger_path):
    code, _, err = run_cli(capsys, "show", "--ledger", tmp_path / "missing.db")
    assert code == 2 and "monai-dp ledger init --ledger" in err
    assert not (tmp_path / "missing.db").exists()  # show never creates a ledger
    code, _, err = run_cli(capsys, "show", "--ledger", ledger_path, "--dataset-id", "mri")
    assert code == 2 and "got 'mri'" in err
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    assert main([]) == 2 and "ledger" in capsys.readouterr().err


def test_fingerprint_of_a_datalist(capsys, tmp_path):
    records = [{"image": f"img{i}.nii.gz", "label": i % 2} for i in range(4)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": records}))
    code, out, _ = run_cli(capsys, "fingerprint", "--datalist", tmp_path / "datalist.json")
    assert code == 0 and out.strip() == dataset_fingerprint(records)
    code, _, err = run_cli(capsys, "fingerprint", "--datalist", tmp_path / "datalist.json", "--key", "validation")
    assert code == 2 and "`--key` must be a list in" in err
