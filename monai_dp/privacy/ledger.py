"""A persistent privacy ledger: every DP training run on a data set, against that data set's (ε, δ) budget.

One SQLite file (standard library ``sqlite3``; WAL journal, ``synchronous=FULL``). Each data set (identified by
:func:`~monai_dp.privacy.fingerprint.dataset_fingerprint` or any stable id) has a fixed budget; each run records
its mechanism (σ, q, clip norm, unit, group size), who ran it where, and how many steps it took.

- The total spent is the tight PLD composition (:func:`~monai_dp.privacy.pld.compose_epsilon`) of all runs, not a
  sum of ε's. Runs of the same mechanism are merged into one (σ, q, steps, group) term first, so the total does
  not depend on the order of runs and stays fast to compute for long ledgers.
- :meth:`PrivacyLedger.begin_run` reserves steps before the first step: a run that does not fit is refused
  (:class:`~monai_dp.utils.errors.PrivacyBudgetExhaustedError`), one that partly fits is shortened. A running run
  counts its whole reservation, so two trainers starting at once cannot both spend the last of the budget.
- :meth:`LedgerRun.claim_step` commits ``steps_taken + 1`` *before* the step is taken (write-ahead): a crash can
  only over-count. A run whose process died is marked ``interrupted`` and counts the steps it claimed.
- Rows are never deleted; triggers refuse deletes, changes of a budget or of a run's mechanism, and updates of
  a run that has ended.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Self

from monai_dp.privacy.pld import Mechanism, compose_epsilon, max_steps_within_budget
from monai_dp.utils.errors import PrivacyBudgetExhaustedError
from monai_dp.utils.validation import (
    check_choice,
    check_open_unit_interval,
    check_positive,
    check_positive_int,
    error_message,
)

__all__ = ["LedgerRun", "PrivacyLedger", "RunPlan", "Spent"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
UNITS = ("record", "patient")
FINAL_STATUSES = ("finished", "stopped", "failed")
BUSY_TIMEOUT_S = 30.0
_OPTIMISTIC_TRIES = 3  # PLD queries run outside the write lock; after this many lost races, under it
_HOST = socket.gethostname()

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ("CREATE TABLE IF NOT EXISTS datasets(dataset_id TEXT PRIMARY KEY, epsilon REAL NOT NULL CHECK (epsilon > 0), "
     "delta REAL NOT NULL CHECK (delta > 0 AND delta < 1), unit TEXT NOT NULL CHECK (unit IN ('record', 'patient')), "
     "created_at TEXT NOT NULL, created_by TEXT NOT NULL, description TEXT NOT NULL DEFAULT '')"),
    ("CREATE TABLE IF NOT EXISTS runs(run_id INTEGER PRIMARY KEY AUTOINCREMENT, "
     "dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id), status TEXT NOT NULL CHECK (status IN "
     "('running', 'finished', 'stopped', 'failed', 'interrupted')), unit TEXT NOT NULL CHECK (unit IN "
     "('record', 'patient')), sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1), "
     "noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0), max_grad_norm REAL NOT NULL, "
     "group_size INTEGER NOT NULL CHECK (group_size >= 1), reserved_steps INTEGER NOT NULL, "
     "steps_taken INTEGER NOT NULL DEFAULT 0 CHECK (steps_taken >= 0 AND steps_taken <= reserved_steps), "
     "started_at TEXT NOT NULL, finished_at TEXT, user TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
     "note TEXT NOT NULL DEFAULT '', resumes INTEGER REFERENCES runs(run_id))"),
    "CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs(dataset_id, status)",
    # append-only: nothing is deleted, budgets and mechanisms never change, an ended run stays as it ended
    ("CREATE TRIGGER IF NOT EXISTS datasets_keep BEFORE DELETE ON datasets "
     "BEGIN SELECT RAISE(ABORT, 'privacy ledger: data sets are never deleted'); END"),
    ("CREATE TRIGGER IF NOT EXISTS datasets_fixed BEFORE UPDATE ON datasets "
     "BEGIN SELECT RAISE(ABORT, 'privacy ledger: a recorded budget never changes'); END"),
    ("CREATE TRIGGER IF NOT EXISTS runs_keep BEFORE DELETE ON runs "
     "BEGIN SELECT RAISE(ABORT, 'privacy ledger: runs are never deleted'); END"),
    ("CREATE TRIGGER IF NOT EXISTS runs_append_only BEFORE UPDATE ON runs WHEN OLD.status != 'running' "
     "OR NEW.steps_taken < OLD.steps_taken OR NEW.reserved_steps != OLD.reserved_steps "
     "OR NEW.dataset_id != OLD.dataset_id OR NEW.unit != OLD.unit OR NEW.sample_rate != OLD.sample_rate "
     "OR NEW.noise_multiplier != OLD.noise_multiplier OR NEW.group_size != OLD.group_size "
     "OR NEW.started_at != OLD.started_at OR NEW.pid != OLD.pid OR NEW.host != OLD.host "
     "BEGIN SELECT RAISE(ABORT, 'privacy ledger: only a running run is updated, and only forward'); END"),
)


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


class RunPlan(NamedTuple):
    """What :meth:`PrivacyLedger.check_run` found: steps that fit, ε before and after them (at the budget δ)."""

    dataset_id: str
    planned_steps: int
    allowed_steps: int
    spent_epsilon: float
    epsilon_after: float
    budget_epsilon: float
    budget_delta: float


class Spent(NamedTuple):
    """ε spent on a data set and the runs that spent it (dicts with their ``charged_steps``)."""

    epsilon: float
    runs: list[dict]


class _Request(NamedTuple):
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    unit: str
    group_size: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name (containers without USER); the ledger still records pid and host
        return "unknown"


def _charged(run: sqlite3.Row | dict, reservations: bool) -> int:
    """Steps a run is charged: its reservation while it runs (if ``reservations``), else the steps it claimed."""
    if reservations and run["status"] == "running":
        return max(run["reserved_steps"], run["steps_taken"])
    return run["steps_taken"]


def _canonical(mechanisms: Iterable[Mechanism]) -> tuple[Mechanism, ...]:
    """One term per (σ, q, group) with the steps summed, sorted: the same composition, independent of order."""
    steps: dict[tuple, int] = {}
    for m in mechanisms:
        key = (m.noise_multiplier, m.sample_rate, m.group_size)
        steps[key] = steps.get(key, 0) + m.steps
    return tuple(sorted(Mechanism(s, q, n, g) for (s, q, g), n in steps.items() if n > 0))


def _mechanisms(runs: Iterable[sqlite3.Row | dict], reservations: bool = True) -> tuple[Mechanism, ...]:
    """What the runs spent, as a canonical composition (running runs count their reservation if asked)."""
    return _canonical(Mechanism(r["noise_multiplier"], r["sample_rate"], _charged(r, reservations), r["group_size"])
                      for r in runs)


def _epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    return compose_epsilon(_canonical(mechanisms), delta)


def _check_dataset_id(dataset_id: Any) -> str:
    if not isinstance(dataset_id, str):
        raise TypeError(error_message("dataset_id", "a str", type(dataset_id).__name__))
    if not (dataset_id and dataset_id == dataset_id.strip() and dataset_id.isprintable() and len(dataset_id) <= 256):
        raise ValueError(error_message("dataset_id", "a non-empty printable str of at most 256 characters without "
                                       "surrounding spaces", dataset_id))
    return dataset_id


class PrivacyLedger:
    """The ledger in the SQLite file ``path`` (created with its tables unless ``create=False``).

    One connection per process (re-opened after a fork); use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, create: bool = True, timeout: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        self.timeout = check_positive("timeout", timeout)
        if not create and not self.path.is_file():
            raise FileNotFoundError(error_message(
                "path", "an existing ledger file", str(self.path),
                f"Create it with `monai-dp ledger init --ledger {self.path} --dataset-id ID --epsilon E --delta D`."))
        if not self.path.parent.is_dir():
            raise FileNotFoundError(error_message("path", "a file in an existing folder", str(self.path),
                                                  "Create the folder first; the ledger does not create folders."))
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._inherited: list[sqlite3.Connection] = []
        self._setup()

    # -- connection and transactions -------------------------------------------------------------------------
    @property
    def _con(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:  # inherited through fork: never use it, never close it (it is the parent's)
                self._inherited.append(self._conn)
            self._conn, self._pid = self._connect(), os.getpid()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as err:
            con.close()
            raise ValueError(error_message("path", "a privacy ledger (SQLite) file", str(self.path))) from err
        if mode.lower() != "wal":
            logger.warning("Privacy ledger %s: WAL journal unavailable (got %r); using it with a rollback journal.",
                           self.path, mode)
        return con

    def _setup(self) -> None:
        with self._write() as con:
            for statement in _SCHEMA:
                con.execute(statement)
            con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(error_message("ledger schema_version", f"at most {SCHEMA_VERSION}", version,
                                             f"{self.path} was written by a newer monai_dp; upgrade monai_dp."))

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time across processes; rolled back on error."""
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        with self._write() as con:
            row = con.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
            if row is None:
                con.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (dataset_id, epsilon, delta, unit, _now(), _user(), description))
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
        ds = self._dataset(self._con, dataset_id)
        return ds["epsilon"], ds["delta"]

    def dataset_unit(self, dataset_id: str) -> str:
        """The unit (``'record'`` or ``'patient'``) the budget of ``dataset_id`` protects."""
        return self._dataset(self._con, dataset_id)["unit"]

    def dataset_ids(self) -> list[str]:
        return [r[0] for r in self._con.execute("SELECT dataset_id FROM datasets ORDER BY created_at, dataset_id")]

    def _runs(self, con: sqlite3.Connection, dataset_id: str) -> list[sqlite3.Row]:
        return con.execute("SELECT * FROM runs WHERE dataset_id = ? ORDER BY run_id", (dataset_id,)).fetchall()

    def run(self, run_id: int) -> dict:
        """The ledger row of run ``run_id`` as a dict."""
        row = self._con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(error_message("run_id", f"a run recorded in the ledger {str(self.path)!r}", run_id))
        return dict(row)

    # -- accounting -------------------------------------------------------------------------------------------
    def spent(self, dataset_id: str, reservations: bool = True) -> Spent:
        """ε spent on ``dataset_id`` at its budget δ; running runs count their reservation if ``reservations``."""
        con = self._con
        ds = self._dataset(con, dataset_id)
        runs = self._runs(con, dataset_id)
        eps = compose_epsilon(_mechanisms(runs, reservations), ds["delta"])
        return Spent(eps, [dict(r, charged_steps=_charged(r, reservations)) for r in runs])

    def _request(self, ds: sqlite3.Row, noise_multiplier: Any, sample_rate: Any, planned_steps: Any, unit: Any,
                 group_size: Any) -> _Request:
        sigma = check_positive("noise_multiplier", noise_multiplier,
                               "A run without noise cannot be recorded against a privacy budget.")
        q = check_positive("sample_rate", sample_rate)
        if not q <= 1:
            raise ValueError(error_message("sample_rate", "in (0, 1]", sample_rate))
        steps = check_positive_int("planned_steps", planned_steps)
        unit = check_choice("unit", unit, UNITS)
        if unit == ds["unit"]:
            if group_size not in (None, 1):
                raise ValueError(error_message("group_size", f"1 for a {unit}-level run on a {unit}-level budget",
                                               group_size, "group_size is for record-level runs charged to a "
                                               "patient-level budget."))
            return _Request(sigma, q, steps, unit, 1)
        if unit == "patient":
            raise ValueError(error_message(
                "unit", f"'record' on data set {ds['dataset_id']!r}, whose budget is record-level", unit,
                "A patient-level run protects patients, not each record of a patient with several records, so its "
                "record-level cost is not bounded by its patient-level ε; register the data set with unit 'patient'."))
        if group_size is None:
            raise ValueError(error_message(
                "group_size", f"the largest number of records per patient for a record-level run on the "
                f"patient-level data set {ds['dataset_id']!r}", group_size,
                "A patient with k records is charged the mixture-of-Gaussians cost of k records."))
        return _Request(sigma, q, steps, unit, check_positive_int("group_size", group_size))

    def _plan(self, ds: sqlite3.Row, req: _Request, spent: tuple[Mechanism, ...]) -> RunPlan:
        """The largest step count ≤ planned whose canonical composition with ``spent`` stays within the budget."""
        eps, delta = ds["epsilon"], ds["delta"]
        spent_eps = compose_epsilon(spent, delta)
        n, after = req.planned_steps, _epsilon([*spent, Mechanism(req.noise_multiplier, req.sample_rate,
                                                                  req.planned_steps, req.group_size)], delta)
        if after > eps:
            n = max_steps_within_budget(spent, req.noise_multiplier, req.sample_rate, req.group_size, eps, delta,
                                        req.planned_steps)
            after = spent_eps
            # the ledger composes same-mechanism runs as one term; make sure that (its reported total) fits too
            while n > 0:
                after = _epsilon([*spent, Mechanism(req.noise_multiplier, req.sample_rate, n, req.group_size)], delta)
                if after <= eps:
                    break
                n -= 1
            after = after if n else spent_eps
        return RunPlan(ds["dataset_id"], req.planned_steps, n, spent_eps, after, eps, delta)

    def check_run(self, dataset_id: str, noise_multiplier: float, sample_rate: float, planned_steps: int,
                  unit: str = "record", group_size: int | None = None) -> RunPlan:
        """A dry run of :meth:`begin_run`: what would fit now (reserves nothing); raises if not a single step."""
        self.recover(dataset_id)
        ds = self._dataset(self._con, dataset_id)
        req = self._request(ds, noise_multiplier, sample_rate, planned_steps, unit, group_size)
        runs = self._runs(self._con, ds["dataset_id"])
        plan = self._plan(ds, req, _mechanisms(runs))
        if plan.allowed_steps == 0:
            raise PrivacyBudgetExhaustedError(self._exhausted_message(ds, runs, plan.spent_epsilon, req))
        return plan

    def begin_run(self, dataset_id: str, noise_multiplier: float, sample_rate: float, max_grad_norm: float,
                  planned_steps: int, unit: str = "record", group_size: int | None = None, note: str = "",
                  resumes: int | None = None) -> LedgerRun:
        """Reserve up to ``planned_steps`` steps of (σ, q) on ``dataset_id`` before the first step.

        Refused with :class:`PrivacyBudgetExhaustedError` if not a single step fits; shortened (WARNING) if only
        some do. ``group_size`` is needed, and only allowed, for a record-level run on a patient-level budget:
        the largest number of records of one patient. The PLD queries run outside the write lock and are checked
        under it (``BEGIN IMMEDIATE``): if another run started or ended meanwhile, the plan is made again.
        """
        clip = check_positive("max_grad_norm", max_grad_norm)
        if not isinstance(note, str):
            raise TypeError(error_message("note", "a str", type(note).__name__))
        for attempt in range(_OPTIMISTIC_TRIES + 1):
            locked = attempt == _OPTIMISTIC_TRIES
            if not locked:
                self.recover(dataset_id)
                ds = self._dataset(self._con, dataset_id)
                req = self._request(ds, noise_multiplier, sample_rate, planned_steps, unit, group_size)
                spent = _mechanisms(self._runs(self._con, ds["dataset_id"]))
                plan = self._plan(ds, req, spent)
            with self._write() as con:
                if locked:
                    self._recover(con, dataset_id)
                runs = self._runs(con, ds["dataset_id"])
                if locked:
                    spent = _mechanisms(runs)
                    plan = self._plan(ds, req, spent)
                elif _mechanisms(runs) != spent:
                    continue  # lost a race: another run started, ended or was recovered; plan again
                if plan.allowed_steps == 0:
                    raise PrivacyBudgetExhaustedError(self._exhausted_message(ds, runs, plan.spent_epsilon, req))
                cur = con.execute(
                    "INSERT INTO runs(dataset_id, status, unit, sample_rate, noise_multiplier, max_grad_norm, "
                    "group_size, reserved_steps, steps_taken, started_at, user, host, pid, note, resumes) "
                    "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
                    (ds["dataset_id"], req.unit, req.sample_rate, req.noise_multiplier, clip, req.group_size,
                     plan.allowed_steps, _now(), _user(), _HOST, os.getpid(), note, resumes))
                run_id = cur.lastrowid
            if plan.allowed_steps < req.planned_steps:
                logger.warning("Privacy ledger: run %d on dataset %r is shortened to %d of the %d planned steps: "
                               "ε = %.4g of the budget %g (δ = %g) is spent or reserved; %d steps bring it to %.4g.",
                               run_id, ds["dataset_id"], plan.allowed_steps, req.planned_steps, plan.spent_epsilon,
                               plan.budget_epsilon, plan.budget_delta, plan.allowed_steps, plan.epsilon_after)
            return LedgerRun(self, run_id, ds["dataset_id"], plan)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt plans under the lock

    def resume_run(self, run_id: int, planned_steps: int) -> LedgerRun:
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
        group = old["group_size"] if old["unit"] != self._dataset(self._con, old["dataset_id"])["unit"] else None
        return self.begin_run(old["dataset_id"], old["noise_multiplier"], old["sample_rate"], old["max_grad_norm"],
                              planned_steps, old["unit"], group, note=f"resumes run {run_id}", resumes=run_id)

    def _exhausted_message(self, ds: sqlite3.Row, runs: list[sqlite3.Row], spent_eps: float, req: _Request) -> str:
        charged = [r for r in runs if _charged(r, True) > 0]
        lines = [(f"Privacy budget of dataset {ds['dataset_id']!r} (ε = {ds['epsilon']:g}, δ = {ds['delta']:g}, "
                 f"{ds['unit']}-level) is exhausted: spent ε = {spent_eps:.4g} (PLD composition of {len(charged)} "
                 "run(s); running runs count their reservation). Not a single step of the requested run "
                 f"(noise_multiplier = {req.noise_multiplier:g}, sample_rate = {req.sample_rate:g}, "
                 f"{req.unit}-level, group_size = {req.group_size}) fits. Runs that spent it:")]
        lines += [f"  run {r['run_id']}: {r['status']}, by {r['user']}@{r['host']}, started {r['started_at']}, "
                  f"{_charged(r, True)} steps, noise_multiplier = {r['noise_multiplier']:g}, "
                  f"sample_rate = {r['sample_rate']:g}, group_size = {r['group_size']}" for r in charged]
        if spent_eps < ds["epsilon"]:
            lines.append("A run with a larger noise_multiplier or a smaller sample_rate may still fit the rest.")
        return "\n".join(lines)

    # -- recovery ---------------------------------------------------------------------------------------------
    def recover(self, dataset_id: str | None = None) -> list[int]:
        """Mark ``running`` runs of this host whose process is gone as ``interrupted``; return their ids.

        They then count the steps they claimed (write-ahead, so at least every step they took).
        """
        if not self._stale(self._con, dataset_id):
            return []  # the common case needs no write lock
        with self._write() as con:
            return self._recover(con, dataset_id)

    def _stale(self, con: sqlite3.Connection, dataset_id: str | None) -> list[int]:
        sql, args = "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", [_HOST]
        if dataset_id is not None:
            sql, args = sql + " AND dataset_id = ?", [*args, dataset_id]
        return [r["run_id"] for r in con.execute(sql, args).fetchall() if not pid_alive(r["pid"])]

    def _recover(self, con: sqlite3.Connection, dataset_id: str | None) -> list[int]:
        stale = self._stale(con, dataset_id)
        for run_id in stale:
            con.execute("UPDATE runs SET status = 'interrupted', finished_at = ? WHERE run_id = ?", (_now(), run_id))
        if stale:
            logger.warning("Privacy ledger %s: runs %s were left running by processes that are gone; marked "
                           "interrupted, counting the steps they claimed.", self.path, stale)
        return stale

    def interrupt_run(self, run_id: int) -> None:
        """Mark a ``running`` run ``interrupted`` by hand (a run on another host that died, a reused pid).

        Safe even if it is still alive: its next :meth:`LedgerRun.claim_step` fails, so it takes no unrecorded step.
        """
        with self._write() as con:
            if con.execute("UPDATE runs SET status = 'interrupted', finished_at = ? WHERE run_id = ? AND "
                           "status = 'running'", (_now(), run_id)).rowcount != 1:
                raise ValueError(error_message("run_id", "a running run", run_id))

    # -- reports ----------------------------------------------------------------------------------------------
    def summary(self, dataset_id: str | None = None) -> list[dict]:
        """One dict per data set: budget, ε spent (steps taken), ε committed (with reservations), its runs."""
        ids = self.dataset_ids() if dataset_id is None else [dataset_id]
        out = []
        for did in ids:
            ds = dict(self._dataset(self._con, did))
            runs = self._runs(self._con, did)
            out.append({"dataset_id": did, "budget_epsilon": ds["epsilon"], "budget_delta": ds["delta"],
                        "unit": ds["unit"], "description": ds["description"], "created_at": ds["created_at"],
                        "created_by": ds["created_by"],
                        "spent_epsilon": compose_epsilon(_mechanisms(runs, False), ds["delta"]),
                        "committed_epsilon": compose_epsilon(_mechanisms(runs, True), ds["delta"]),
                        "runs": [dict(r, charged_steps=_charged(r, True)) for r in runs]})
        return out

    def export(self, dataset_id: str | None = None) -> dict:
        """A JSON-able account: the ledger, when, how ε is composed, and :meth:`summary` of the data sets."""
        return {"ledger": str(self.path), "schema_version": SCHEMA_VERSION, "exported_at": _now(),
                "accounting": "PLD composition (dp-accounting) of all runs at the budget delta; running runs count "
                              "their reserved steps", "datasets": self.summary(dataset_id)}

    def format_account(self, dataset_id: str | None = None, markdown: bool = False) -> str:
        """A human-readable account (plain text, or markdown with ``markdown=True``)."""
        return _format_account(str(self.path), self.summary(dataset_id), markdown)


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    return ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def _format_account(path: str, datasets: list[dict], markdown: bool) -> str:
    lines = [f"# Privacy ledger `{path}`" if markdown else f"Privacy ledger {path}"]
    if not datasets:
        lines.append("No data set registered.")
    headers = ["run", "status", "user@host", "started", "finished", "steps", "reserved", "noise_multiplier",
               "sample_rate", "max_grad_norm", "unit", "group_size", "note"]
    for d in datasets:
        title = (f"Dataset {d['dataset_id']} ({d['unit']}-level): budget ε = {d['budget_epsilon']:g}, "
                 f"δ = {d['budget_delta']:g}")
        running = sum(r["status"] == "running" for r in d["runs"])
        spent = (f"Spent: ε = {d['spent_epsilon']:.4g} of {d['budget_epsilon']:g}, PLD composition of "
                 f"{len(d['runs'])} run(s) at δ = {d['budget_delta']:g} (not a sum of ε's)")
        if running:
            spent += f"; with the reservations of {running} running run(s): ε = {d['committed_epsilon']:.4g}"
        lines += ["", f"## {title}" if markdown else title, "",
                  f"Registered {d['created_at']} by {d['created_by']}. {d['description']}".rstrip(), spent, ""]
        rows = [[str(r["run_id"]), r["status"], f"{r['user']}@{r['host']}", r["started_at"], r["finished_at"] or "",
                 str(r["steps_taken"]), str(r["reserved_steps"]), f"{r['noise_multiplier']:g}",
                 f"{r['sample_rate']:g}", f"{r['max_grad_norm']:g}", r["unit"], str(r["group_size"]), r["note"]]
                for r in d["runs"]]
        lines += _table(headers, rows, markdown) if rows else ["No runs yet."]
    return "\n".join(lines) + "\n"


class LedgerRun:
    """A run reserved by :meth:`PrivacyLedger.begin_run`: claim every step before taking it, then :meth:`finish`.

    As a context manager it finishes the run on exit: ``finished``, ``stopped`` on a
    :class:`PrivacyBudgetExhaustedError`, ``failed`` on any other exception.
    """

    def __init__(self, ledger: PrivacyLedger, run_id: int, dataset_id: str, plan: RunPlan):
        self.ledger, self.run_id, self.dataset_id, self.plan = ledger, run_id, dataset_id, plan
        self.allowed_steps = plan.allowed_steps
        self.spent_before = plan.spent_epsilon
        self.steps_taken = 0
        self.status = "running"

    @property
    def remaining_steps(self) -> int:
        return self.allowed_steps - self.steps_taken

    def claim_step(self) -> int:
        """Record one more step (committed before the caller takes it) and return the steps claimed so far.

        Raises :class:`PrivacyBudgetExhaustedError` when the reservation is used up, ``RuntimeError`` when the run
        is no longer running.
        """
        con = self.ledger._con
        cur = con.execute("UPDATE runs SET steps_taken = steps_taken + 1 WHERE run_id = ? AND status = 'running' "
                          "AND steps_taken < reserved_steps", (self.run_id,))
        if cur.rowcount != 1:
            row = self.ledger.run(self.run_id)
            if row["status"] != "running":
                raise RuntimeError(error_message("run status", "'running' to claim a step", row["status"],
                                                 f"Run {self.run_id} has ended; begin or resume a run."))
            raise PrivacyBudgetExhaustedError(
                f"Run {self.run_id} on dataset {self.dataset_id!r} has taken all {row['reserved_steps']} steps its "
                f"ledger reservation allows (budget ε = {self.plan.budget_epsilon:g}, "
                f"δ = {self.plan.budget_delta:g}); step {row['reserved_steps'] + 1} would exceed the budget.")
        self.steps_taken += 1
        return self.steps_taken

    def finish(self, status: str = "finished") -> None:
        """End the run (``finished``, ``stopped`` or ``failed``): it now counts the steps it claimed."""
        status = check_choice("status", status, FINAL_STATUSES)
        with self.ledger._write() as con:
            if con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ? AND status = 'running'",
                           (status, _now(), self.run_id)).rowcount != 1:
                now = con.execute("SELECT status FROM runs WHERE run_id = ?", (self.run_id,)).fetchone()[0]
                raise RuntimeError(error_message("run status", "'running' to finish it", now,
                                                 f"Run {self.run_id} has already ended."))
        self.status = status

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.status == "running":
            status = ("finished" if exc is None else
                      "stopped" if isinstance(exc, PrivacyBudgetExhaustedError) else "failed")
            self.finish(status)

    def __repr__(self) -> str:
        return (f"LedgerRun(run_id={self.run_id}, dataset_id={self.dataset_id!r}, steps_taken={self.steps_taken}, "
                f"allowed_steps={self.allowed_steps}, status={self.status!r})")
