"""Privacy ledger: budgets, composition of runs, refusal and shortening, reservations, races and crashes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from monai_dp.cli.ledger_text import account_text
from monai_dp.privacy.fingerprint import dataset_fingerprint
from monai_dp.privacy.ledger import PrivacyLedger
from monai_dp.privacy.pld import Mechanism, compose_epsilon, max_steps_within_budget
from monai_dp.utils.errors import PrivacyBudgetExhaustedError

DELTA = 1e-5
SIGMA, Q = 2.0, 0.1  # coarse mechanism: a few steps cost ε ≈ 0.5–1, and each PLD query is fast


def eps(*mechanisms: Mechanism) -> float:
    return compose_epsilon(list(mechanisms), DELTA)


def between(n: int) -> float:
    """A budget that fits n steps of (SIGMA, Q) and not n + 1, with a wide margin on both sides."""
    return (eps(Mechanism(SIGMA, Q, n)) + eps(Mechanism(SIGMA, Q, n + 1))) / 2


def raw_connection(tmp_path) -> sqlite3.Connection:
    """A plain connection in autocommit mode (a failed statement must not leave a transaction holding the lock)."""
    return sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.db") as led:
        yield led


def test_init_is_idempotent_and_a_budget_never_changes(ledger, tmp_path):
    assert ledger.init_dataset("ds", 1.0, DELTA, description="chest x-rays") is True
    assert ledger.init_dataset("ds", 1.0, DELTA) is False
    with pytest.raises(ValueError, match=r"budget recorded for dataset 'ds', \(1, 1e-05, 'record'\), got \(2.0"):
        ledger.init_dataset("ds", 2.0, DELTA)
    with pytest.raises(sqlite3.DatabaseError, match="never changes"):
        raw_connection(tmp_path).execute("UPDATE datasets SET epsilon = 5")
    with PrivacyLedger(tmp_path / "ledger.db", create=False) as again:  # persisted
        assert again.dataset_ids() == ["ds"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"epsilon": 0.0}, ValueError, r"`epsilon` must be a finite number > 0, got 0.0"),
    ({"epsilon": float("nan")}, ValueError, r"`epsilon` must be a finite number > 0, got nan"),
    ({"epsilon": float("inf")}, ValueError, r"`epsilon` must be a finite number > 0, got inf"),
    ({"delta": 1.0}, ValueError, r"`delta` must be in \(0, 1\), got 1.0"),
    ({"delta": "1e-5"}, TypeError, r"`delta` must be a number, got 'str'"),
    ({"unit": "site"}, ValueError, r"`unit` must be one of \['record', 'patient'\], got 'site'"),
    ({"dataset_id": ""}, ValueError, r"`dataset_id` must be a non-empty printable str"),
    ({"dataset_id": 3}, TypeError, r"`dataset_id` must be a str, got 'int'"),
])
def test_init_validation(ledger, kwargs, error, match):
    args = {"dataset_id": "ds", "epsilon": 1.0, "delta": DELTA, **kwargs}
    with pytest.raises(error, match=match):
        ledger.init_dataset(**args)


def test_paths_and_unknown_dataset(tmp_path, ledger):
    with pytest.raises(FileNotFoundError, match=r"`path` must be a file in an existing folder, got '.*nope"):
        PrivacyLedger(tmp_path / "nope" / "ledger.db")
    with pytest.raises(FileNotFoundError, match=r"an existing ledger file.*monai-dp ledger init --ledger"):
        PrivacyLedger(tmp_path / "missing.db", create=False)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match=r"`path` must be a privacy ledger \(SQLite\) file"):
        PrivacyLedger(tmp_path / "junk.db")
    with pytest.raises(ValueError, match=r"`dataset_id` must be a data set registered.*got 'other'.*"
                                         r"monai-dp ledger init --ledger .* --dataset-id other"):
        ledger.begin_run("other", SIGMA, Q, 1.0, 5)


def test_unit_rules(ledger):
    ledger.init_dataset("records", 5.0, DELTA, unit="record")
    ledger.init_dataset("patients", 5.0, DELTA, unit="patient")
    assert (ledger.budget("patients"), ledger.dataset_unit("patients")) == ((5.0, DELTA), "patient")
    with pytest.raises(ValueError, match=r"`unit` must be 'record' on data set 'records'.*register the data set "
                                         r"with unit 'patient'"):
        ledger.begin_run("records", SIGMA, Q, 1.0, 5, unit="patient")
    with pytest.raises(ValueError, match=r"`group_size` must be the largest number of records per patient.*"
                                         r"got None"):
        ledger.begin_run("patients", SIGMA, Q, 1.0, 5, unit="record")
    with pytest.raises(ValueError, match=r"`group_size` must be 1 for a record-level run on a record-level"):
        ledger.begin_run("records", SIGMA, Q, 1.0, 5, group_size=3)
    with pytest.raises(ValueError, match=r"`sample_rate` must be in \(0, 1\], got 1.5"):
        ledger.begin_run("records", SIGMA, 1.5, 1.0, 5)
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be a finite number > 0, got 0.*without noise"):
        ledger.begin_run("records", 0.0, Q, 1.0, 5)
    # a record-level run on a patient-level budget is charged the cost for patients with k records
    with ledger.begin_run("patients", SIGMA, Q, 1.0, 4, unit="record", group_size=2) as run:
        for _ in range(4):
            run.claim_step()
    spent = ledger.spent("patients")
    assert spent.epsilon == pytest.approx(eps(Mechanism(SIGMA, Q, 4, 2)))
    assert spent.epsilon > eps(Mechanism(SIGMA, Q, 4))


def test_total_is_the_composition_of_the_runs_not_a_sum(ledger):
    ledger.init_dataset("ds", 10.0, DELTA)
    first, second = Mechanism(SIGMA, Q, 5), Mechanism(3.0, 0.2, 4)
    for m in (first, second):
        with ledger.begin_run("ds", m.noise_multiplier, m.sample_rate, 1.0, m.steps) as run:
            for _ in range(m.steps):
                run.claim_step()
    spent = ledger.spent("ds")
    assert [r["status"] for r in spent.runs] == ["finished", "finished"]
    assert spent.epsilon == pytest.approx(eps(first, second), rel=1e-9)
    assert spent.epsilon < eps(first) + eps(second)
    assert ledger.summary("ds")[0]["spent_epsilon"] == pytest.approx(spent.epsilon)


def test_a_run_that_does_not_fit_is_refused_naming_dataset_budget_spent_and_runs(ledger):
    ledger.init_dataset("ct-2024", between(10), DELTA)
    with ledger.begin_run("ct-2024", SIGMA, Q, 1.0, 10) as run:
        assert run.allowed_steps == 10 and run.spent_before == 0
        for _ in range(10):
            run.claim_step()
    with pytest.raises(PrivacyBudgetExhaustedError) as info:
        ledger.begin_run("ct-2024", SIGMA, Q, 1.0, 10)
    msg = str(info.value)
    spent = eps(Mechanism(SIGMA, Q, 10))
    assert "dataset 'ct-2024'" in msg and f"ε = {between(10):g}, δ = {DELTA:g}" in msg
    assert f"spent ε = {spent:.4g}" in msg
    assert "run 1: finished, by " in msg and "10 steps, noise_multiplier = 2, sample_rate = 0.1" in msg
    assert len(ledger.spent("ct-2024").runs) == 1  # nothing recorded for the refused run


def test_a_run_that_partly_fits_is_shortened_to_the_largest_step_count(ledger, caplog):
    ledger.init_dataset("ds", between(15), DELTA)
    with ledger.begin_run("ds", SIGMA, Q, 1.0, 10) as run:
        for _ in range(10):
            run.claim_step()
    with caplog.at_level(logging.WARNING, logger="monai_dp.privacy.ledger"):
        short = ledger.begin_run("ds", SIGMA, Q, 1.0, 10)
    assert short.allowed_steps == 5
    assert "shortened to 5 of the 10 planned steps" in caplog.text
    done = Mechanism(SIGMA, Q, 10)
    assert eps(done, Mechanism(SIGMA, Q, 5)) <= between(15) < eps(done, Mechanism(SIGMA, Q, 6))
    short.finish("stopped")
    # another mechanism: the ledger agrees with max_steps_within_budget on what is spent
    other = ledger.begin_run("ds", 4.0, 0.05, 1.0, 200)
    spent = [Mechanism(SIGMA, Q, 10)]  # the shortened run took no step
    expected = max_steps_within_budget(spent, 4.0, 0.05, 1, between(15), DELTA, 200)
    assert 0 < other.allowed_steps == expected < 200


def test_reservations_claims_and_finish(ledger):
    ledger.init_dataset("ds", between(15), DELTA)
    a = ledger.begin_run("ds", SIGMA, Q, 1.0, 10)
    b = ledger.begin_run("ds", SIGMA, Q, 1.0, 10)
    assert (a.allowed_steps, b.allowed_steps) == (10, 5)  # a's whole reservation counts while it runs
    assert ledger.spent("ds").epsilon == pytest.approx(eps(Mechanism(SIGMA, Q, 15)))
    assert ledger.spent("ds", reservations=False).epsilon == 0
    for _ in range(3):
        a.claim_step()
    a.finish("stopped")  # releases the 7 unused steps of its reservation
    assert ledger.run(a.run_id)["steps_taken"] == 3
    c = ledger.begin_run("ds", SIGMA, Q, 1.0, 10)
    assert c.allowed_steps == 7  # 15 - 3 taken by a - 5 reserved by b
    assert [b.claim_step() for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"Run 2 on dataset 'ds' has taken all 5 steps"):
        b.claim_step()
    assert ledger.run(b.run_id)["steps_taken"] == 5
    with pytest.raises(RuntimeError, match=r"`run status` must be 'running' to claim a step, got 'stopped'"):
        a.claim_step()
    with pytest.raises(RuntimeError, match=r"`run status` must be 'running' to finish it, got 'stopped'"):
        a.finish()
    with pytest.raises(ValueError, match=r"`status` must be one of \['finished', 'stopped', 'failed'\]"):
        c.finish("running")


def test_context_manager_statuses_and_append_only_rows(ledger, tmp_path):
    ledger.init_dataset("ds", 10.0, DELTA)
    with ledger.begin_run("ds", SIGMA, Q, 1.0, 3) as ok:
        ok.claim_step()
    for exc in (PrivacyBudgetExhaustedError("budget"), KeyError("bug")):
        with pytest.raises(type(exc)), ledger.begin_run("ds", SIGMA, Q, 1.0, 3) as run:
            run.claim_step()
            raise exc
    assert [r["status"] for r in ledger.spent("ds").runs] == ["finished", "stopped", "failed"]
    con = raw_connection(tmp_path)
    with pytest.raises(sqlite3.DatabaseError, match="runs are never deleted"):
        con.execute("DELETE FROM runs")
    with pytest.raises(sqlite3.DatabaseError, match="only a running run is updated"):
        con.execute("UPDATE runs SET steps_taken = 0 WHERE run_id = 1")


def test_recover_keeps_live_runs_and_interrupt_run_stops_them(ledger):
    ledger.init_dataset("ds", 10.0, DELTA)
    run = ledger.begin_run("ds", SIGMA, Q, 1.0, 5)
    run.claim_step()
    assert ledger.recover() == []  # this process is alive
    ledger.interrupt_run(run.run_id)
    with pytest.raises(RuntimeError, match="got 'interrupted'"):
        run.claim_step()
    assert ledger.spent("ds").epsilon == pytest.approx(eps(Mechanism(SIGMA, Q, 1)))
    with pytest.raises(ValueError, match=r"`run_id` must be a running run, got 1"):
        ledger.interrupt_run(run.run_id)


# -- several processes ----------------------------------------------------------------------------------------------
def _race(path: str, barrier, results) -> None:
    led = PrivacyLedger(path)
    barrier.wait()
    try:
        run = led.begin_run("ds", SIGMA, Q, 1.0, 10)
        results.put(("ok", run.allowed_steps))
    except PrivacyBudgetExhaustedError as err:
        results.put(("refused", str(err)))


def _crash(path: str) -> None:
    run = PrivacyLedger(path).begin_run("ds", SIGMA, Q, 1.0, 10)
    for _ in range(5):
        run.claim_step()
    os._exit(1)  # no finish, no close: as if the process were killed mid-run


@pytest.mark.distributed
def test_two_trainers_starting_at_once_cannot_both_spend_the_last_of_the_budget(ledger):
    ledger.init_dataset("ds", between(10), DELTA)  # room for exactly one run of 10 steps
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(ledger.path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcome = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcome[0] == ("ok", 10)
    assert outcome[1][0] == "refused" and "run 1: running" in outcome[1][1]
    runs = ledger.spent("ds").runs
    assert [r["reserved_steps"] for r in runs] == [10]
    assert ledger.spent("ds").epsilon <= between(10)


@pytest.mark.distributed
def test_a_crash_mid_run_counts_the_steps_claimed_before_it(ledger):
    ledger.init_dataset("ds", between(12), DELTA)
    proc = mp.get_context("spawn").Process(target=_crash, args=(str(ledger.path),))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 1
    row = ledger.run(1)
    assert (row["status"], row["steps_taken"], row["pid"]) == ("running", 5, proc.pid)
    assert ledger.recover() == [1]
    row = ledger.run(1)
    assert (row["status"], row["steps_taken"]) == ("interrupted", 5)
    assert ledger.spent("ds").epsilon == pytest.approx(eps(Mechanism(SIGMA, Q, 5)))
    resumed = ledger.resume_run(1, planned_steps=10)  # a trainer resumed from its checkpoint
    assert resumed.allowed_steps == 7 and ledger.run(resumed.run_id)["resumes"] == 1
    with pytest.raises(ValueError, match=r"`run_id` must be an interrupted or failed run, got 'run 2 \(running\)'"):
        ledger.resume_run(resumed.run_id, 3)


# -- fingerprint ----------------------------------------------------------------------------------------------------
def test_fingerprint_is_order_independent_and_changes_with_any_record():
    recs = [{"patient_id": f"p{i}", "image": Path(f"/data/img{i}.nii.gz"), "label": i % 2} for i in range(5)]
    fp = dataset_fingerprint(recs)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 16
    assert dataset_fingerprint(recs[::-1]) == fp
    assert dataset_fingerprint([dict(r, image=str(r["image"])) for r in recs]) == fp  # a Path is its string
    assert dataset_fingerprint([*recs[:4], dict(recs[4], label=1)]) != fp
    assert dataset_fingerprint([*recs[:4], dict(recs[4], label="1")]) != fp  # types stay distinct
    assert dataset_fingerprint(recs[:4]) != fp
    assert dataset_fingerprint([dict(r, extra=np.zeros(3)) for r in recs]) == fp  # only identifying keys count
    assert dataset_fingerprint(recs, keys=["patient_id"]) != fp


def test_fingerprint_hashes_arrays_and_tensors():
    torch = pytest.importorskip("torch")
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    recs = [{"image": arr, "label": np.int64(1)}, {"image": arr + 1, "label": 0}]
    fp = dataset_fingerprint(recs)
    assert dataset_fingerprint([{"image": arr.copy(), "label": 1}, {"image": arr + 1, "label": 0}]) == fp
    assert dataset_fingerprint([{"image": torch.from_numpy(arr), "label": 1}, recs[1]]) == fp
    changed = arr.copy()
    changed[2, 3] += 1e-3
    assert dataset_fingerprint([{"image": changed, "label": 1}, recs[1]]) != fp
    assert dataset_fingerprint([{"image": arr.reshape(4, 3), "label": 1}, recs[1]]) != fp  # shape counts
    assert dataset_fingerprint([{"image": arr.astype(np.float64), "label": 1}, recs[1]]) != fp  # dtype counts
    nested = [{"image": [arr, {"b": 1, "a": "x"}]}]
    assert dataset_fingerprint(nested) == dataset_fingerprint([{"image": [arr, {"a": "x", "b": 1}]}])


@pytest.mark.parametrize("records, error, match", [
    ([], ValueError, r"`records` must be a non-empty list of dict records, got \[\]"),
    ("abc", TypeError, r"`records` must be a list of dict records, got 'str'"),
    ([{"x": 1}], ValueError, r"`records\[0\]` must be a dict holding at least one of the keys.*got \['x'\]"),
    ([{"image": object()}], TypeError, r"`record value` must be a str, path, number, array"),
])
def test_fingerprint_errors(records, error, match):
    with pytest.raises(error, match=match):
        dataset_fingerprint(records)


def test_sampling_and_seeded_noise_are_recorded_fixed_and_shown(ledger, tmp_path):
    ledger.init_dataset("ds", 10.0, DELTA)
    ledger.begin_run("ds", SIGMA, Q, 1.0, 2).finish()
    seeded = ledger.begin_run("ds", SIGMA, Q, 1.0, 2, sampling="shuffle", noise_seeded=True)
    assert [(r["sampling"], r["noise_seeded"]) for r in ledger.spent("ds").runs] == [("poisson", 0), ("shuffle", 1)]
    with pytest.raises(sqlite3.DatabaseError, match="only a running run is updated"):
        raw_connection(tmp_path).execute("UPDATE runs SET noise_seeded = 0 WHERE run_id = 2")
    seeded.finish()
    text = account_text(ledger.export())
    assert "run 2: reproducible noise: not private against someone who knows the seed" in text
    assert "run 2: sampling 'shuffle', not Poisson: the ε charged assumes Poisson sampling" in text
    assert "run 1:" not in text
    crashed = ledger.begin_run("ds", SIGMA, Q, 1.0, 2)
    ledger.interrupt_run(crashed.run_id)
    resumed = ledger.resume_run(crashed.run_id, 2, sampling="shuffle", noise_seeded=True)
    assert (ledger.run(resumed.run_id)["sampling"], ledger.run(resumed.run_id)["noise_seeded"]) == ("shuffle", 1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"noise_seeded": "yes"}, TypeError, r"`noise_seeded` must be a bool, got 'str'"),
    ({"noise_seeded": None}, TypeError, r"`noise_seeded` must be a bool, got 'NoneType'"),
    ({"sampling": ""}, ValueError, r"`sampling` must be a non-empty printable str \(e.g. 'poisson'\), got ''"),
    ({"sampling": 1}, TypeError, r"`sampling` must be a str, got 'int'"),
])
def test_sampling_and_noise_seeded_validation(ledger, kwargs, error, match):
    ledger.init_dataset("ds", 10.0, DELTA)
    with pytest.raises(error, match=match):
        ledger.begin_run("ds", SIGMA, Q, 1.0, 2, **kwargs)
    assert ledger.spent("ds").runs == []
