"""A persistent privacy ledger: every DP training run on a data set, against that data set's (ε, δ) budget.

One SQLite file (standard library ``sqlite3``; WAL journal, ``synchronous=FULL``). Each data set (identified by
:func:`~monai_dp.privacy.fingerprint.dataset_fingerprint` or any stable id) has a fixed budget; each run records
its mechanism (σ, q, clip norm, unit, group size, sampling, whether its noise was seeded), who ran it where, and
how many steps it took.

- The total spent is the tight PLD composition (:func:`~monai_dp.privacy.pld.compose_epsilon`) of all runs, not a
  sum of ε's. Runs of the same mechanism are merged into one (σ, q, steps, group) term first, so the total does
  not depend on the order of runs and stays fast to compute for long ledgers.
- :meth:`PrivacyLedger.begin_run` reserves steps before the first step: a run that does not fit is refused
  (:class:`~monai_dp.utils.errors.PrivacyBudgetExhaustedError`), one that partly fits is shortened. A running run
  counts its whole reservation, so two trainers starting at once cannot both spend the last of the budget.
- :meth:`LedgerRun.claim_step` commits ``steps_taken + 1`` *before* the step is taken (write-ahead): a crash can
  only over-count. A run whose process died is marked ``interrupted`` and counts the steps it claimed.
- Rows are never deleted; triggers refuse deletes, replacements, changes of a budget or of a run's mechanism,
  and updates of a run that has ended. Every registration, start and end of a run is an event of a hash chain
  (:mod:`~monai_dp.privacy.ledger_chain`), verified whenever the ledger is used: a ledger changed behind its
  back raises :class:`~monai_dp.utils.errors.LedgerIntegrityError` naming what changed.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sqlite3
from typing import Any, Self

from monai_dp.privacy.ledger_chain import ChainState, append_event, find_event
from monai_dp.privacy.ledger_plan import (
    UNITS,
    check_request,
    exhausted_message,
    plan_run,
)
from monai_dp.privacy.ledger_run import (
    LedgerRun,
    RunPlan,
    Spent,
    charged,
    end_run,
    mechanisms,
    run_row,
)
from monai_dp.privacy.ledger_schema import SCHEMA_VERSION
from monai_dp.privacy.ledger_store import BUSY_TIMEOUT_S, LedgerStore, now
from monai_dp.privacy.pld import compose_epsilon
from monai_dp.utils.errors import LedgerIntegrityError, PrivacyBudgetExhaustedError
from monai_dp.utils.validation import (
    check_choice,
    check_open_unit_interval,
    check_positive,
    error_message,
)

__all__ = ["ChainState", "LedgerRun", "LedgerStore", "PrivacyLedger", "RunPlan", "Spent"]

logger = logging.getLogger(__name__)

_OPTIMISTIC_TRIES = 3  # PLD queries run outside the write lock; after this many lost races, under it
_HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (``True`` when it cannot be told: keep the reservation)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would not probe on Windows; stale runs there need interrupt_run
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name (containers without USER); pid and host are still recorded
        return "unknown"


def _check_dataset_id(dataset_id: Any) -> str:
    if not isinstance(dataset_id, str):
        raise TypeError(error_message("dataset_id", "a str", type(dataset_id).__name__))
    if not (dataset_id and dataset_id == dataset_id.strip() and dataset_id.isprintable() and len(dataset_id) <= 256):
        raise ValueError(error_message("dataset_id", "a non-empty printable str of at most 256 characters without "
                                       "surrounding spaces", dataset_id))
    return dataset_id


class PrivacyLedger:
    """The ledger in the SQLite file ``path``.

    A missing file is created (with its tables and the genesis of its hash chain) unless ``create=False``; an
    existing one is verified (:meth:`verify`) before any use and again whenever another connection changed it.
    ``read_only=True`` reads a ledger that may not be written (a read-only file or folder, an archive): writes
    then raise ``PermissionError``, as does opening a read-only ledger without it. One connection per process
    (re-opened after a fork); use as a context manager or call :meth:`close`. Storage (file, connection,
    transactions, verification) is :attr:`store`, a :class:`~monai_dp.privacy.ledger_store.LedgerStore` shared
    with the :class:`LedgerRun` handles this ledger hands out.
    """

    def __init__(self, path: str | os.PathLike, create: bool = True, timeout: float = BUSY_TIMEOUT_S,
                 read_only: bool = False):
        self.store = LedgerStore(path, create=create, timeout=timeout, read_only=read_only)
        self.path, self.timeout, self.read_only = self.store.path, self.store.timeout, self.store.read_only

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self, expect_head: str | None = None) -> ChainState:
        """Check the whole ledger now (schema, hash chain, tables against the chain); its head and size.

        With ``expect_head`` (a head copied earlier, e.g. from a run report), also check that the chain still holds
        it: a ledger rewritten consistently, or rolled back to an older state, does not.
        """
        if expect_head is not None and not (isinstance(expect_head, str) and len(expect_head) == 64
                                            and all(c in "0123456789abcdefABCDEF" for c in expect_head)):
            raise ValueError(error_message("expect_head", "the 64 hex digits of a ledger head", expect_head))
        with self.store.read() as con:
            state = self.store.check(con, force=True)
            at = None if expect_head is None else find_event(con, expect_head)
        if expect_head is not None and at is None:
            raise LedgerIntegrityError(
                f"Privacy ledger {str(self.path)!r} does not hold the expected head {expect_head.lower()} in its hash "
                f"chain (its head is {state.head}, after {state.events} events): it was rewritten or rolled back "
                "since that head was copied (a restored older copy, a lost -wal file, an edited chain).")
        return state._replace(expected_at=at)

    def head(self) -> str:
        """The head of the ledger's hash chain: keep a copy elsewhere to check the ledger against later."""
        with self.store.read() as con:
            return con.execute("SELECT value FROM meta WHERE key = 'chain_head'").fetchone()[0]

    def backup(self, output: str | os.PathLike) -> ChainState:
        """Copy the ledger to the new file ``output`` with SQLite's online backup API (``-wal`` included); the copy
        is verified before it is put in place. Returns the copy's state."""
        self.verify()
        return self.store.backup(output)

    # -- data sets --------------------------------------------------------------------------------------------
    def init_dataset(self, dataset_id: str, epsilon: float, delta: float, unit: str = "record",
                     description: str = "") -> bool:
        """Register ``dataset_id`` with its budget; ``False`` if it already has this very budget (no-op).

        A recorded budget never changes: a different (ε, δ, unit) for an existing id raises ``ValueError``.
        """
        dataset_id = _check_dataset_id(dataset_id)
        epsilon = check_positive("epsilon", epsilon)
        delta = check_open_unit_interval("delta", delta)
        unit = check_choice("unit", unit, UNITS)
        if not isinstance(description, str):
            raise TypeError(error_message("description", "a str", type(description).__name__))
        with self.store.write() as con:
            row = con.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
            if row is None:
                con.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (dataset_id, epsilon, delta, unit, now(), _user(), description))
                append_event(con, "dataset", dict(self._dataset(con, dataset_id)))
                return True
        if (row["epsilon"], row["delta"], row["unit"]) != (epsilon, delta, unit):
            raise ValueError(error_message(
                "(epsilon, delta, unit)", f"the budget recorded for dataset {dataset_id!r}, "
                f"({row['epsilon']:g}, {row['delta']:g}, {row['unit']!r})", (epsilon, delta, unit),
                "A recorded budget cannot be changed; a different data set needs its own dataset id."))
        return False

    def _dataset(self, con: sqlite3.Connection, dataset_id: str) -> sqlite3.Row:
        row = con.execute("SELECT * FROM datasets WHERE dataset_id = ?", (_check_dataset_id(dataset_id),)).fetchone()
        if row is None:
            raise ValueError(error_message(
                "dataset_id", f"a data set registered in the ledger {str(self.path)!r}", dataset_id,
                f"Register it with `monai-dp ledger init --ledger {self.path} --dataset-id {dataset_id} "
                "--epsilon E --delta D`."))
        return row

    def budget(self, dataset_id: str) -> tuple[float, float]:
        """The total budget ``(epsilon, delta)`` of ``dataset_id``."""
        with self.store.read() as con:
            ds = self._dataset(con, dataset_id)
        return ds["epsilon"], ds["delta"]

    def dataset_unit(self, dataset_id: str) -> str:
        """The unit (``'record'`` or ``'patient'``) the budget of ``dataset_id`` protects."""
        with self.store.read() as con:
            return self._dataset(con, dataset_id)["unit"]

    def dataset_ids(self) -> list[str]:
        with self.store.read() as con:
            return [r[0] for r in con.execute("SELECT dataset_id FROM datasets ORDER BY created_at, dataset_id")]

    def _runs(self, con: sqlite3.Connection, dataset_id: str) -> list[sqlite3.Row]:
        return con.execute("SELECT * FROM runs WHERE dataset_id = ? ORDER BY run_id", (dataset_id,)).fetchall()

    def run(self, run_id: int) -> dict:
        """The ledger row of run ``run_id`` as a dict."""
        with self.store.read() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(error_message("run_id", f"a run recorded in the ledger {str(self.path)!r}", run_id))
        return dict(row)

    # -- accounting -------------------------------------------------------------------------------------------
    def spent(self, dataset_id: str, reservations: bool = True) -> Spent:
        """ε spent on ``dataset_id`` at its budget δ; running runs count their reservation if ``reservations``."""
        with self.store.read() as con:
            ds = self._dataset(con, dataset_id)
            runs = self._runs(con, dataset_id)
        eps = compose_epsilon(mechanisms(runs, reservations), ds["delta"])
        return Spent(eps, [dict(r, charged_steps=charged(r, reservations)) for r in runs])

    def check_run(self, dataset_id: str, noise_multiplier: float, sample_rate: float, planned_steps: int,
                  unit: str = "record", group_size: int | None = None) -> RunPlan:
        """A dry run of :meth:`begin_run`: what would fit now (reserves nothing); raises if not a single step."""
        if not self.read_only:
            self.recover(dataset_id)
        with self.store.read() as con:
            ds = self._dataset(con, dataset_id)
            req = check_request(ds, noise_multiplier, sample_rate, planned_steps, unit, group_size)
            runs = self._runs(con, ds["dataset_id"])
        plan = plan_run(ds, req, mechanisms(runs))
        if plan.allowed_steps == 0:
            raise PrivacyBudgetExhaustedError(exhausted_message(ds, runs, plan.spent_epsilon, req))
        return plan

    def begin_run(self, dataset_id: str, noise_multiplier: float, sample_rate: float, max_grad_norm: float,
                  planned_steps: int, unit: str = "record", group_size: int | None = None, note: str = "",
                  resumes: int | None = None, sampling: str = "poisson", noise_seeded: bool = False) -> LedgerRun:
        """Reserve up to ``planned_steps`` steps of (σ, q) on ``dataset_id`` before the first step.

        Refused with :class:`PrivacyBudgetExhaustedError` if not a single step fits; shortened (WARNING) if only
        some do. ``group_size`` is needed, and only allowed, for a record-level run on a patient-level budget:
        the largest number of records of one patient. The PLD queries run outside the write lock and are checked
        under it (``BEGIN IMMEDIATE``): if another run started or ended meanwhile, the plan is made again.
        ``sampling`` (the trainer's ``privacy.sampling``) and ``noise_seeded`` (whether its noise came from a fixed
        seed, reproducible by whoever knows it) are recorded with the run and shown in its account.
        """
        clip = check_positive("max_grad_norm", max_grad_norm)
        if not isinstance(note, str):
            raise TypeError(error_message("note", "a str", type(note).__name__))
        if not isinstance(sampling, str):
            raise TypeError(error_message("sampling", "a str", type(sampling).__name__))
        if not (sampling and sampling.isprintable()):
            raise ValueError(error_message("sampling", "a non-empty printable str (e.g. 'poisson')", sampling))
        if not isinstance(noise_seeded, bool):
            raise TypeError(error_message("noise_seeded", "a bool", type(noise_seeded).__name__))
        for attempt in range(_OPTIMISTIC_TRIES + 1):
            locked = attempt == _OPTIMISTIC_TRIES
            if not locked:
                self.recover(dataset_id)
                with self.store.read() as con:
                    ds = self._dataset(con, dataset_id)
                    req = check_request(ds, noise_multiplier, sample_rate, planned_steps, unit, group_size)
                    spent = mechanisms(self._runs(con, ds["dataset_id"]))
                plan = plan_run(ds, req, spent)
            with self.store.write() as con:
                if locked:
                    self._recover(con, dataset_id)
                runs = self._runs(con, ds["dataset_id"])
                if locked:
                    spent = mechanisms(runs)
                    plan = plan_run(ds, req, spent)
                elif mechanisms(runs) != spent:
                    continue  # lost a race: another run started, ended or was recovered; plan again
                if plan.allowed_steps == 0:
                    raise PrivacyBudgetExhaustedError(exhausted_message(ds, runs, plan.spent_epsilon, req))
                cur = con.execute(
                    "INSERT INTO runs(dataset_id, status, unit, sample_rate, noise_multiplier, max_grad_norm, "
                    "group_size, reserved_steps, steps_taken, started_at, user, host, pid, note, resumes, sampling, "
                    "noise_seeded) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (ds["dataset_id"], req.unit, req.sample_rate, req.noise_multiplier, clip, req.group_size,
                     plan.allowed_steps, now(), _user(), _HOST, os.getpid(), note, resumes, sampling,
                     int(noise_seeded)))
                run_id = cur.lastrowid
                append_event(con, "run", run_row(con, run_id))
            if plan.allowed_steps < req.planned_steps:
                logger.warning("Privacy ledger: run %d on dataset %r is shortened to %d of the %d planned steps: "
                               "ε = %.4g of the budget %g (δ = %g) is spent or reserved; %d steps bring it to %.4g.",
                               run_id, ds["dataset_id"], plan.allowed_steps, req.planned_steps, plan.spent_epsilon,
                               plan.budget_epsilon, plan.budget_delta, plan.allowed_steps, plan.epsilon_after)
            return LedgerRun(self.store, run_id, ds["dataset_id"], plan)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt plans under the lock

    def resume_run(self, run_id: int, planned_steps: int, sampling: str = "poisson",
                   noise_seeded: bool = False) -> LedgerRun:
        """A new run continuing the interrupted or failed run ``run_id`` (same mechanism), with its own reservation.

        The old run keeps its status and the steps it claimed; the new one records ``resumes = run_id``.
        """
        old = self.run(run_id)
        if old["status"] == "running":
            self.recover(old["dataset_id"])
            old = self.run(run_id)
        if old["status"] not in ("interrupted", "failed"):
            raise ValueError(error_message("run_id", "an interrupted or failed run", f"run {run_id} ({old['status']})",
                                           "Only a run that crashed can be resumed; start a new one with begin_run."))
        group = old["group_size"] if old["unit"] != self.dataset_unit(old["dataset_id"]) else None
        return self.begin_run(old["dataset_id"], old["noise_multiplier"], old["sample_rate"], old["max_grad_norm"],
                              planned_steps, old["unit"], group, note=f"resumes run {run_id}", resumes=run_id,
                              sampling=sampling, noise_seeded=noise_seeded)

    # -- recovery ---------------------------------------------------------------------------------------------
    def recover(self, dataset_id: str | None = None) -> list[int]:
        """Mark ``running`` runs of this host whose process is gone as ``interrupted``; return their ids.

        They then count the steps they claimed (write-ahead, so at least every step they took).
        """
        with self.store.read() as con:
            if not self._stale(con, dataset_id):
                return []  # the common case needs no write lock
        with self.store.write() as con:
            return self._recover(con, dataset_id)

    def _stale(self, con: sqlite3.Connection, dataset_id: str | None) -> list[int]:
        sql, args = "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", [_HOST]
        if dataset_id is not None:
            sql, args = sql + " AND dataset_id = ?", [*args, dataset_id]
        return [r["run_id"] for r in con.execute(sql, args).fetchall() if not pid_alive(r["pid"])]

    def _recover(self, con: sqlite3.Connection, dataset_id: str | None) -> list[int]:
        stale = self._stale(con, dataset_id)
        for run_id in stale:
            end_run(con, run_id, "interrupted")
        if stale:
            logger.warning("Privacy ledger %s: runs %s were left running by processes that are gone; marked "
                           "interrupted, counting the steps they claimed.", self.path, stale)
        return stale

    def interrupt_run(self, run_id: int) -> dict:
        """Mark a ``running`` run ``interrupted`` by hand (a run on another host that died, a reused pid); its row.

        Safe even if it is still alive: its next :meth:`LedgerRun.claim_step` fails, so it takes no unrecorded step.
        It counts the steps it claimed. ``monai-dp ledger release RUN`` calls this.
        """
        with self.store.write() as con:
            if not end_run(con, run_id, "interrupted"):
                raise ValueError(error_message("run_id", "a running run", run_id))
            return run_row(con, run_id)

    # -- reports ----------------------------------------------------------------------------------------------
    def summary(self, dataset_id: str | None = None) -> list[dict]:
        """One dict per data set: budget, ε spent (steps taken), ε committed (with reservations), its runs."""
        with self.store.read() as con:
            ids = self.dataset_ids() if dataset_id is None else [dataset_id]
            rows = [(dict(self._dataset(con, did)), self._runs(con, did)) for did in ids]
        out = []
        for (ds, runs), did in zip(rows, ids):
            out.append({"dataset_id": did, "budget_epsilon": ds["epsilon"], "budget_delta": ds["delta"],
                        "unit": ds["unit"], "description": ds["description"], "created_at": ds["created_at"],
                        "created_by": ds["created_by"],
                        "spent_epsilon": compose_epsilon(mechanisms(runs, False), ds["delta"]),
                        "committed_epsilon": compose_epsilon(mechanisms(runs, True), ds["delta"]),
                        "runs": [dict(r, charged_steps=charged(r, True)) for r in runs]})
        return out

    def export(self, dataset_id: str | None = None) -> dict:
        """A JSON-able account: the ledger, when, how ε is composed, and :meth:`summary` of the data sets."""
        with self.store.read():
            state, datasets = self.verify(), self.summary(dataset_id)
        return {"ledger": str(self.path), "schema_version": SCHEMA_VERSION, "exported_at": now(),
                "head": state.head, "events": state.events,
                "accounting": "PLD composition (dp-accounting) of all runs at the budget delta; running runs count "
                              "their reserved steps", "datasets": datasets}

