"""``monai-dp ledger``: init, show, export, check, verify, backup, release, migrate and fingerprint commands."""

from __future__ import annotations

import json
import os
import re
import sqlite3

import pytest

from monai_dp.cli import main
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


def head_of(out: str) -> str:
    return re.search(r"^head ([0-9a-f]{64})$", out, re.MULTILINE).group(1)


def test_verify_prints_the_head_and_checks_a_copied_one(capsys, ledger_path):
    record_run(ledger_path, 2)
    code, out, _ = run_cli(capsys, "verify", "--ledger", ledger_path)
    assert code == 0 and "is intact: 4 events in its hash chain, 1 data set(s), 1 run(s)" in out
    head = head_of(out)
    assert head == PrivacyLedger(ledger_path, read_only=True).head()
    code, out, _ = run_cli(capsys, "show", "--ledger", ledger_path)
    assert f"Hash chain head: {head} (4 events)" in out
    assert json.loads(run_cli(capsys, "export", "--ledger", ledger_path)[1])["head"] == head
    record_run(ledger_path, 1)
    code, out, _ = run_cli(capsys, "verify", "--ledger", ledger_path, "--expect-head", head)
    assert code == 0 and "The expected head is event 4 of 6" in out and head_of(out) != head
    code, _, err = run_cli(capsys, "verify", "--ledger", ledger_path, "--expect-head", "ab" * 32)
    assert code == 4 and f"does not hold the expected head {'ab' * 32}" in err


def test_a_tampered_ledger_exits_4_from_every_command(capsys, ledger_path):
    record_run(ledger_path, 2)
    con = sqlite3.connect(ledger_path, isolation_level=None)
    con.execute("DROP TRIGGER runs_append_only")
    con.execute("UPDATE runs SET steps_taken = 0")
    con.close()
    for argv in (["verify"], ["show"], ["export"], ["check", "--dataset-id", "ct-2024", "--noise-multiplier", 2,
                                                    "--sample-rate", 0.1, "--steps", 1]):
        code, out, err = run_cli(capsys, argv[0], "--ledger", ledger_path, *argv[1:])
        assert code == 4 and out == "", argv
        assert f"Privacy ledger '{ledger_path}' fails its integrity check" in err
        assert "trigger runs_append_only is missing (dropped)" in err and "run 1: steps_taken is 0" in err


def test_backup_copies_what_is_still_in_the_wal(capsys, ledger_path, tmp_path):
    led = PrivacyLedger(ledger_path)
    run = led.begin_run("ct-2024", 2.0, 0.1, 1.0, 5)
    run.claim_step()  # committed to the -wal of an open ledger
    code, out, _ = run_cli(capsys, "backup", "--ledger", ledger_path, "--output", tmp_path / "copy.db")
    assert code == 0 and f"Backed up {ledger_path} to {tmp_path / 'copy.db'}" in out and head_of(out) == led.head()
    copy = PrivacyLedger(tmp_path / "copy.db", read_only=True)
    assert copy.run(1)["steps_taken"] == 1 and copy.verify().head == led.head()
    code, _, err = run_cli(capsys, "backup", "--ledger", ledger_path, "--output", tmp_path / "copy.db")
    assert code == 2 and "never overwrites" in err


def test_release_marks_a_dead_run_interrupted(capsys, ledger_path):
    led = PrivacyLedger(ledger_path)
    run = led.begin_run("ct-2024", 2.0, 0.1, 1.0, 5)
    run.claim_step()
    run.claim_step()
    code, out, _ = run_cli(capsys, "release", "--ledger", ledger_path, 1)
    assert code == 0 and "Run 1 on dataset 'ct-2024'" in out and "marked interrupted: it counts the 2 step(s)" in out
    assert led.run(1)["status"] == "interrupted" and led.spent("ct-2024").runs[0]["charged_steps"] == 2
    with pytest.raises(RuntimeError, match="got 'interrupted'"):
        run.claim_step()
    code, _, err = run_cli(capsys, "release", "--ledger", ledger_path, 1)
    assert code == 2 and "`run_id` must be a running run, got 1" in err


def test_show_export_and_verify_on_a_read_only_ledger(capsys, ledger_path):
    record_run(ledger_path, 2)
    os.chmod(ledger_path, 0o444)
    os.chmod(ledger_path.parent, 0o555)
    try:
        for command in ("show", "export", "verify"):
            code, out, err = run_cli(capsys, command, "--ledger", ledger_path)
            assert code == 0 and ("ct-2024" in out or "is intact" in out), (command, err)
        code, _, err = run_cli(capsys, "release", "--ledger", ledger_path, 1)
        assert code == 2 and f"`path` must be a writable ledger to record runs in, got '{ledger_path}'" in err
        assert sorted(p.name for p in ledger_path.parent.iterdir()) == ["ledger.db"]
    finally:
        os.chmod(ledger_path.parent, 0o755)
        os.chmod(ledger_path, 0o644)


def test_init_refuses_an_emptied_ledger_and_migrate_writes_a_new_one(capsys, ledger_path, tmp_path):
    ledger_path.write_bytes(b"")
    code, _, err = run_cli(capsys, "init", "--ledger", ledger_path, "--dataset-id", "x", "--epsilon", 1.0,
                           "--delta", DELTA)
    assert code == 4 and "is an empty file (0 bytes)" in err and ledger_path.stat().st_size == 0
    old = tmp_path / "v1.db"
    con = sqlite3.connect(old, isolation_level=None)
    con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("CREATE TABLE datasets(dataset_id TEXT PRIMARY KEY, epsilon REAL, delta REAL, unit TEXT, "
                "created_at TEXT, created_by TEXT, description TEXT)")
    con.execute("CREATE TABLE runs(run_id INTEGER PRIMARY KEY, dataset_id TEXT, status TEXT, unit TEXT, "
                "sample_rate REAL, noise_multiplier REAL, max_grad_norm REAL, group_size INTEGER, "
                "reserved_steps INTEGER, steps_taken INTEGER, started_at TEXT, finished_at TEXT, user TEXT, "
                "host TEXT, pid INTEGER, note TEXT, resumes INTEGER)")
    con.execute("INSERT INTO datasets VALUES ('mri', 3.0, 1e-05, 'record', '2025-01-01', 'alice', '')")
    con.close()
    code, _, err = run_cli(capsys, "show", "--ledger", old)
    assert code == 2 and "monai-dp ledger migrate --ledger" in err
    code, out, _ = run_cli(capsys, "migrate", "--ledger", old, "--output", tmp_path / "v2.db")
    assert code == 0 and "1 data set(s), 0 run(s), chained as they were" in out
    assert head_of(out) == PrivacyLedger(tmp_path / "v2.db", read_only=True).head()
