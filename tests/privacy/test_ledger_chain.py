"""The privacy ledger's hash chain against an attacker who edits the SQLite file behind the ledger's back."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.privacy.ledger_chain import GENESIS_PREV, event_hash
from monai_dp.privacy.ledger_schema import TRIGGERS
from monai_dp.utils.errors import LedgerIntegrityError

DELTA = 1e-5
SIGMA, Q = 2.0, 0.1
RUN_COLUMNS = ("run_id, dataset_id, status, unit, sample_rate, noise_multiplier, max_grad_norm, group_size, "
               "reserved_steps, steps_taken, started_at, finished_at, user, host, pid, note, resumes, sampling, "
               "noise_seeded")


def finished_run(led: PrivacyLedger, steps: int = 3) -> int:
    with led.begin_run("ds", SIGMA, Q, 1.0, steps) as run:
        for _ in range(steps):
            run.claim_step()
    return run.run_id


@pytest.fixture
def path(tmp_path):
    """A ledger with a budget of ε = 2 and one finished run of 3 steps; closed."""
    with PrivacyLedger(tmp_path / "ledger.db") as led:
        led.init_dataset("ds", 2.0, DELTA)
        finished_run(led)
    return tmp_path / "ledger.db"


def tamper(path, *statements: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    for sql in statements:
        con.execute(sql)
    con.close()


def refused(path, match: str) -> None:
    """Opening the ledger (as a trainer does) raises an integrity error naming the file and ``match``."""
    with pytest.raises(LedgerIntegrityError, match=rf"Privacy ledger '{re.escape(str(path))}' fails its integrity "
                                                   rf"check(.|\n)*{match}"):
        PrivacyLedger(path, create=False)


def test_a_new_ledger_verifies_and_its_head_moves_with_every_event_but_not_with_step_claims(tmp_path):
    led = PrivacyLedger(tmp_path / "ledger.db")
    genesis = led.head()
    assert len(genesis) == 64 and led.verify() == (genesis, 1, 0, 0, None)
    led.init_dataset("ds", 2.0, DELTA)
    registered = led.head()
    assert registered != genesis and not led.init_dataset("ds", 2.0, DELTA) and led.head() == registered
    run = led.begin_run("ds", SIGMA, Q, 1.0, 5)
    started = led.head()
    run.claim_step()
    assert led.head() == started and led.verify().events == 3  # claims are not events
    run.finish()
    state = led.verify()
    assert state.head == led.head() != started and (state.events, state.datasets, state.runs) == (4, 1, 1)


def test_insert_or_replace_of_a_budget_is_refused_and_caught_without_the_trigger(path):
    raise_budget = ("INSERT OR REPLACE INTO datasets SELECT dataset_id, 1000, delta, unit, created_at, created_by, "
                    "description FROM datasets")
    with pytest.raises(sqlite3.IntegrityError, match="a recorded budget is never replaced"):
        tamper(path, raise_budget)
    tamper(path, "DROP TRIGGER datasets_no_replace", raise_budget, TRIGGERS["datasets_no_replace"])
    refused(path, r"table datasets: dataset 'ds': epsilon is 1000.0, the hash chain says 2.0")


def test_insert_or_replace_resetting_a_finished_run_is_caught(path):
    reset = f"INSERT OR REPLACE INTO runs({RUN_COLUMNS}) SELECT {RUN_COLUMNS.replace('steps_taken', '0')} FROM runs"
    with pytest.raises(sqlite3.IntegrityError, match="a run is never replaced"):
        tamper(path, reset)
    tamper(path, "DROP TRIGGER runs_no_replace", reset)
    refused(path, r"trigger runs_no_replace is missing \(dropped\)(.|\n)*"
                  r"run 1: steps_taken is 0, the hash chain says 3")
    tamper(path, TRIGGERS["runs_no_replace"])  # put back as it was: the rows still disagree with the chain
    refused(path, r"table runs: run 1: steps_taken is 0, the hash chain says 3")


def test_drop_trigger_update_and_reopen_is_caught_and_the_trigger_is_not_recreated(path):
    tamper(path, "DROP TRIGGER runs_append_only", "UPDATE runs SET steps_taken = 0, status = 'running'")
    refused(path, r"trigger runs_append_only is missing \(dropped\)")
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'runs_append_only'").fetchone()[0] == 0
    con.close()
    tamper(path, TRIGGERS["runs_append_only"])
    refused(path, r"run 1: status is 'running', the hash chain says 'finished'(.|\n)*steps_taken is 0")


def test_an_added_trigger_or_an_altered_table_is_caught(path):
    tamper(path, "CREATE TRIGGER sneaky AFTER INSERT ON runs BEGIN UPDATE meta SET value = value; END")
    refused(path, "trigger or view sneaky was added")
    tamper(path, "DROP TRIGGER sneaky", "ALTER TABLE runs ADD COLUMN discount REAL")
    refused(path, r"table runs was altered")


def test_drop_table_runs_is_caught(path):
    tamper(path, "DROP TABLE runs")
    refused(path, r"table runs is missing \(dropped\)")


def test_a_ledger_truncated_to_zero_bytes_is_refused_not_recreated(path):
    path.write_bytes(b"")
    for create in (True, False):
        with pytest.raises(LedgerIntegrityError, match=rf"Privacy ledger '{re.escape(str(path))}' is an empty file "
                                                       r"\(0 bytes\)\. A ledger is never created empty, so this one "
                                                       r"was emptied"):
            PrivacyLedger(path, create=create)
    assert path.stat().st_size == 0


def test_a_sqlite_file_without_ledger_tables_is_refused(tmp_path):
    sqlite3.connect(tmp_path / "other.db").execute("PRAGMA user_version = 1").connection.close()
    assert (tmp_path / "other.db").stat().st_size > 0
    with pytest.raises(LedgerIntegrityError, match=r"holds no ledger \(no tables\)"):
        PrivacyLedger(tmp_path / "other.db")


def _rehash_event(path, seq: int, **changes) -> None:
    """Edit event ``seq``'s body and recompute its own hash (not the events after it, not the stored head)."""
    con = sqlite3.connect(path, isolation_level=None)
    kind, body, prev = con.execute("SELECT kind, body, prev FROM events WHERE seq = ?", (seq,)).fetchone()
    body = json.dumps(dict(json.loads(body), **changes), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    con.execute("DROP TRIGGER events_fixed")
    con.execute("UPDATE events SET body = ?, hash = ? WHERE seq = ?", (body, event_hash(prev, seq, kind, body), seq))
    con.execute(TRIGGERS["events_fixed"])
    con.close()


def test_editing_a_row_and_its_own_event_hash_breaks_the_chain(path):
    with PrivacyLedger(path) as led:
        finished_run(led)  # events: genesis, dataset, run 1, end 1, run 2, end 2
    tamper(path, "DROP TRIGGER runs_append_only", "UPDATE runs SET steps_taken = 0 WHERE run_id = 1",
           TRIGGERS["runs_append_only"])
    _rehash_event(path, 4, steps_taken=0)
    refused(path, r"table events: event 5 \(run\) does not follow event 4 \(chain broken\)")
    # the last event: its successor is the head kept in meta
    tamper(path, "DROP TRIGGER runs_append_only", "UPDATE runs SET steps_taken = 0 WHERE run_id = 2",
           TRIGGERS["runs_append_only"])
    _rehash_event(path, 6, steps_taken=0)
    refused(path, r"table meta: the stored head \(\w+, 6 events\) is not the last event of the chain")


def test_an_event_edited_without_its_hash_and_a_deleted_event_are_caught(path):
    tamper(path, "DROP TRIGGER events_fixed", "UPDATE events SET body = replace(body, '\"epsilon\":2.0', "
           "'\"epsilon\":9.0') WHERE kind = 'dataset'", TRIGGERS["events_fixed"])
    refused(path, r"event 2 \(dataset\) was changed \(its hash does not match its content\)")


def test_a_consistently_rewritten_chain_passes_alone_but_not_against_a_copied_head(path):
    """What a chain cannot do: a whole chain recomputed after an edit is consistent; a head kept elsewhere is not."""
    copied_head = PrivacyLedger(path, read_only=True).head()
    con = sqlite3.connect(path, isolation_level=None)
    for trigger in ("runs_append_only", "events_fixed"):
        con.execute(f"DROP TRIGGER {trigger}")
    con.execute("UPDATE runs SET steps_taken = 0 WHERE run_id = 1")
    prev = GENESIS_PREV
    for seq, kind, body in con.execute("SELECT seq, kind, body FROM events ORDER BY seq").fetchall():
        body = body.replace('"steps_taken":3', '"steps_taken":0') if kind == "run_end" else body
        head = event_hash(prev, seq, kind, body)
        con.execute("UPDATE events SET body = ?, prev = ?, hash = ? WHERE seq = ?", (body, prev, head, seq))
        prev = head
    con.execute("UPDATE meta SET value = ? WHERE key = 'chain_head'", (prev,))
    for trigger in ("runs_append_only", "events_fixed"):
        con.execute(TRIGGERS[trigger])
    con.close()
    led = PrivacyLedger(path, read_only=True)
    assert led.spent("ds").runs[0]["steps_taken"] == 0  # the file alone cannot tell
    with pytest.raises(LedgerIntegrityError, match=rf"'{re.escape(str(path))}' does not hold the expected head "
                                                   rf"{copied_head} in its hash chain \(its head is \w+, after 4 "
                                                   r"events\): it was rewritten"):
        led.verify(expect_head=copied_head)


def test_tampering_while_a_ledger_is_open_is_caught_at_its_next_use(path):
    led = PrivacyLedger(path)
    assert led.spent("ds").runs[0]["steps_taken"] == 3
    tamper(path, "DROP TRIGGER runs_append_only", "UPDATE runs SET steps_taken = 1", TRIGGERS["runs_append_only"])
    for use in (lambda: led.spent("ds"), lambda: led.begin_run("ds", SIGMA, Q, 1.0, 2), lambda: led.budget("ds"),
                lambda: led.summary(), lambda: led.head(), lambda: led.init_dataset("other", 1.0, DELTA)):
        with pytest.raises(LedgerIntegrityError, match=r"run 1: steps_taken is 1, the hash chain says 3"):
            use()
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM datasets").fetchone()[0] == 1


def test_a_running_run_may_claim_steps_between_events_but_not_beyond_its_reservation(path):
    led = PrivacyLedger(path)
    run = led.begin_run("ds", SIGMA, Q, 1.0, 4)
    run.claim_step()
    other = PrivacyLedger(path)  # another process's view: the claims are legitimate
    assert other.spent("ds").runs[1]["steps_taken"] == 1
    tamper(path, "DROP TRIGGER runs_append_only",
           "UPDATE runs SET reserved_steps = 9, steps_taken = 7 WHERE run_id = 2", TRIGGERS["runs_append_only"])
    with pytest.raises(LedgerIntegrityError, match=r"run 2: reserved_steps is 9, the hash chain says 4"):
        other.spent("ds")


def test_expect_head_must_be_hex(path):
    led = PrivacyLedger(path, read_only=True)
    with pytest.raises(ValueError, match=r"`expect_head` must be the 64 hex digits of a ledger head, got 'abc'"):
        led.verify(expect_head="abc")
    head = led.head()
    assert led.verify(expect_head=head.upper()).expected_at == led.verify().events
