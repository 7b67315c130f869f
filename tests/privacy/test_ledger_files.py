"""The privacy ledger's file: -wal and backups, read-only ledgers, migration of schema-1 ledgers."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3

import pytest

from monai_dp.cli.ledger_text import account_text
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.privacy.ledger_migrate import migrate_ledger
from monai_dp.privacy.pld import Mechanism, compose_epsilon
from monai_dp.utils.errors import LedgerIntegrityError

DELTA = 1e-5
SIGMA, Q = 2.0, 0.1


@pytest.fixture
def path(tmp_path):
    """A ledger with a budget of ε = 2 and one finished run of 3 steps; closed."""
    with PrivacyLedger(tmp_path / "ledger.db") as led:
        led.init_dataset("ds", 2.0, DELTA)
        with led.begin_run("ds", SIGMA, Q, 1.0, 3) as run:
            for _ in range(3):
                run.claim_step()
    return tmp_path / "ledger.db"


def wal(path):
    return path.with_name(path.name + "-wal")


def held_back_checkpoint(path) -> sqlite3.Connection:
    """A reader holding an old snapshot: commits after it stay in the -wal file (as under a busy ledger)."""
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM runs").fetchone()
    return reader


def test_backup_holds_the_runs_a_plain_copy_of_the_db_loses(path, tmp_path):
    led = PrivacyLedger(path)
    reader = held_back_checkpoint(path)
    with led.begin_run("ds", SIGMA, Q, 1.0, 4) as run:  # run 2, committed in WAL mode, not yet checkpointed
        run.claim_step()
    reader.close()
    assert wal(path).stat().st_size > 0
    shutil.copy(path, tmp_path / "plain.db")  # what `cp ledger.db` gives while the ledger is in use
    assert [r["run_id"] for r in PrivacyLedger(tmp_path / "plain.db", read_only=True).spent("ds").runs] == [1]
    state = led.backup(tmp_path / "backup.db")
    assert state.head == led.head() and state.runs == 2
    copy = PrivacyLedger(tmp_path / "backup.db", read_only=True)
    assert copy.verify().head == led.head()
    assert [(r["run_id"], r["steps_taken"]) for r in copy.spent("ds").runs] == [(1, 3), (2, 1)]
    with pytest.raises(FileExistsError, match=r"`output` must be a path that does not exist yet.*never overwrites"):
        led.backup(tmp_path / "backup.db")


def test_a_deleted_wal_loses_no_event_and_a_rollback_is_caught_by_a_copied_head(path, tmp_path):
    led = PrivacyLedger(path)
    head = led.head()
    running = led.begin_run("ds", SIGMA, Q, 1.0, 4)
    running.claim_step()
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for f in (path, wal(path)):  # the files as a crash leaves them; then the -wal is deleted
        shutil.copy(f, crashed / f.name)
    (crashed / wal(path).name).unlink()
    # every event reached the .db at once: only the running run's step claims since its start are lost
    after = PrivacyLedger(crashed / "ledger.db", create=False)
    assert after.verify(expect_head=head).expected_at == 4
    assert [(r["run_id"], r["status"], r["steps_taken"]) for r in after.spent("ds").runs] == [
        (1, "finished", 3), (2, "running", 0)]
    # when a reader held the checkpoint back, a deleted -wal rolls events back: consistent, but not what was copied
    reader = held_back_checkpoint(path)
    running.finish()
    reader.close()
    copied = led.head()
    shutil.copy(path, crashed / "rolled_back.db")
    rolled = PrivacyLedger(crashed / "rolled_back.db", read_only=True)
    assert rolled.verify().head != copied
    with pytest.raises(LedgerIntegrityError, match=r"does not hold the expected head .* rolled back"):
        rolled.verify(expect_head=copied)


def test_a_read_only_ledger_file_is_read_but_not_written(path):
    os.chmod(path, 0o444)
    try:
        with pytest.raises(PermissionError, match=rf"`path` must be a writable ledger to record runs in, got "
                                                  rf"'{re.escape(str(path))}'\. Its file .* is read-only; make it "
                                                  r"writable, or open it with read_only=True"):
            PrivacyLedger(path, create=False)
        led = PrivacyLedger(path, read_only=True)
        assert led.verify().runs == 1 and led.spent("ds").runs[0]["steps_taken"] == 3
        assert "Hash chain head: " + led.head() in account_text(led.export())
        with pytest.raises(PermissionError, match=r"`ledger` must be opened without read_only=True to be written"):
            led.begin_run("ds", SIGMA, Q, 1.0, 2)
        assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.db"]  # opened read-only: no -wal, -shm
        led.close()
    finally:
        os.chmod(path, 0o644)


def test_a_ledger_in_a_read_only_folder_is_read_but_not_written(path):
    folder = path.parent
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(PermissionError, match=r"`path` must be a writable ledger.*Its folder .* is read-only"):
            PrivacyLedger(path)
        led = PrivacyLedger(path, read_only=True)
        assert led.verify().runs == 1 and led.export()["head"] == led.head()
        assert sorted(p.name for p in folder.iterdir()) == ["ledger.db"]  # SQLite could not create -wal, -shm here
        led.close()
    finally:
        os.chmod(folder, 0o755)


def test_a_missing_ledger_is_not_created_for_reading_or_with_create_false(tmp_path):
    for kwargs in ({"read_only": True}, {"create": False}):
        with pytest.raises(FileNotFoundError, match=r"`path` must be an existing ledger file.*monai-dp ledger init"):
            PrivacyLedger(tmp_path / "ledger.db", **kwargs)
    assert list(tmp_path.iterdir()) == []


# -- schema version 1 -------------------------------------------------------------------------------------------
V1_SCHEMA = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE datasets(dataset_id TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL, unit TEXT NOT "
    "NULL, created_at TEXT NOT NULL, created_by TEXT NOT NULL, description TEXT NOT NULL DEFAULT '')",
    "CREATE TABLE runs(run_id INTEGER PRIMARY KEY AUTOINCREMENT, dataset_id TEXT NOT NULL, status TEXT NOT NULL, "
    "unit TEXT NOT NULL, sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, max_grad_norm REAL NOT NULL, "
    "group_size INTEGER NOT NULL, reserved_steps INTEGER NOT NULL, steps_taken INTEGER NOT NULL DEFAULT 0, "
    "started_at TEXT NOT NULL, finished_at TEXT, user TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
    "note TEXT NOT NULL DEFAULT '', resumes INTEGER)",
    "INSERT INTO meta VALUES ('schema_version', '1')",
    "INSERT INTO datasets VALUES ('ds', 2.0, 1e-05, 'record', '2025-01-01T00:00:00+00:00', 'alice', 'old')",
    "INSERT INTO runs VALUES (1, 'ds', 'finished', 'record', 0.1, 2.0, 1.0, 1, 5, 3, '2025-01-02T00:00:00+00:00', "
    "'2025-01-02T01:00:00+00:00', 'alice', 'gpu1', 11, 'unet', NULL)",
    "INSERT INTO runs VALUES (2, 'ds', 'running', 'record', 0.1, 2.0, 1.0, 1, 4, 1, '2025-01-03T00:00:00+00:00', "
    "NULL, 'bob', 'gpu2', 12, '', NULL)",
)


@pytest.fixture
def v1_path(tmp_path):
    con = sqlite3.connect(tmp_path / "v1.db", isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    for sql in V1_SCHEMA:
        con.execute(sql)
    con.close()
    return tmp_path / "v1.db"


def test_a_schema_1_ledger_is_refused_with_the_migration_command(v1_path):
    with pytest.raises(RuntimeError, match=r"`ledger schema_version` must be 2 \(runs chained by hashes\), got 1\. "
                                           r".*migrate it with `monai-dp ledger migrate --ledger .*v1.db --output "
                                           r"NEW.db`"):
        PrivacyLedger(v1_path)


def test_migration_chains_the_old_rows_in_a_new_file_and_leaves_the_old_one(v1_path, tmp_path):
    before = v1_path.read_bytes()
    state = migrate_ledger(v1_path, tmp_path / "v2.db")
    assert v1_path.read_bytes() == before
    assert (state.datasets, state.runs, state.events) == (1, 2, 4)
    led = PrivacyLedger(tmp_path / "v2.db", create=False)
    assert led.head() == state.head and led.budget("ds") == (2.0, DELTA)
    runs = led.spent("ds").runs
    assert [(r["run_id"], r["status"], r["steps_taken"], r["sampling"], r["noise_seeded"]) for r in runs] == [
        (1, "finished", 3, "unrecorded", None), (2, "interrupted", 4, "unrecorded", None)]
    assert "migrated while running: charged its whole reservation" in runs[1]["note"]
    assert led.spent("ds").epsilon == pytest.approx(compose_epsilon([Mechanism(SIGMA, Q, 7)], DELTA))
    assert "run 1: sampling not recorded (run migrated from a ledger of schema version 1)" in account_text(led.export())
    assert led.begin_run("ds", SIGMA, Q, 1.0, 2).run_id == 3
    with pytest.raises(FileExistsError, match=r"`output` must be a path that does not exist yet"):
        migrate_ledger(v1_path, tmp_path / "v2.db")
    with pytest.raises(ValueError, match=r"`ledger schema_version` must be 1 to be migrated, got 2\. It already has"):
        migrate_ledger(tmp_path / "v2.db", tmp_path / "v3.db")
