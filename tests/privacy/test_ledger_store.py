"""``LedgerStore``: the storage both the ledger and its runs go through (verified transactions, step claims)."""

from __future__ import annotations

import sqlite3

import pytest

from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.privacy.ledger_store import LedgerStore
from monai_dp.utils.errors import LedgerIntegrityError


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.db") as led:
        led.init_dataset("ds", 5.0, 1e-5)
        yield led


def test_runs_use_the_ledgers_store(ledger):
    run = ledger.begin_run("ds", 2.0, 0.1, 1.0, 3)
    assert run.store is ledger.store
    assert run.claim_step() == 1 and ledger.run(run.run_id)["steps_taken"] == 1


def test_claim_step_counts_only_within_the_reservation_of_a_running_run(ledger):
    run = ledger.begin_run("ds", 2.0, 0.1, 1.0, 2)
    assert [ledger.store.claim_step(run.run_id) for _ in range(3)] == [True, True, False]
    assert ledger.run(run.run_id)["steps_taken"] == 2
    run.finish()
    assert not ledger.store.claim_step(run.run_id)
    assert ledger.run(run.run_id)["steps_taken"] == 2


def test_check_verifies_again_only_after_another_connection_changed_the_ledger(ledger):
    store = ledger.store
    with store.read() as con:
        assert store.check(con) is None  # nothing changed since it was opened
        state = store.check(con, force=True)
    assert state.head == ledger.head() and state.datasets == 1
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("DROP TRIGGER datasets_fixed")  # tampering behind the ledger's back
    other.execute("UPDATE datasets SET epsilon = 50 WHERE dataset_id = 'ds'")
    other.close()
    with pytest.raises(LedgerIntegrityError), store.read():
        pass


def test_a_read_only_store_refuses_writes(ledger, tmp_path):
    store = LedgerStore(ledger.path, read_only=True)
    with pytest.raises(PermissionError, match=r"`ledger` must be opened without read_only=True to be written"):
        with store.write():
            pass
    with store.read() as con:
        assert con.execute("SELECT dataset_id FROM datasets").fetchone()[0] == "ds"
    store.close()


def test_a_missing_file_is_created_with_its_chain_or_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`path` must be an existing ledger file"):
        LedgerStore(tmp_path / "missing.db", create=False)
    store = LedgerStore(tmp_path / "new.db")
    with store.read() as con:
        assert store.check(con, force=True).events == 1  # the genesis event
    store.close()
