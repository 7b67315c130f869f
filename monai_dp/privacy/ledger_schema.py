"""The SQLite schema of the privacy ledger (version 2) and the check that a ledger file still has it.

Every table, index and trigger is created once, when the ledger is created, and never again: a ledger whose
trigger was dropped is refused (:func:`schema_problems`), not silently repaired. ``sqlite_master`` keeps the
statements' text, so the check compares that text with the statements below.
"""

from __future__ import annotations

import sqlite3

__all__ = ["SCHEMA_VERSION", "STATEMENTS", "create_schema", "schema_problems", "schema_version"]

SCHEMA_VERSION = 2

TABLES = {
    "meta": "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "datasets": (
        "CREATE TABLE datasets(dataset_id TEXT PRIMARY KEY, epsilon REAL NOT NULL CHECK (epsilon > 0), "
        "delta REAL NOT NULL CHECK (delta > 0 AND delta < 1), "
        "unit TEXT NOT NULL CHECK (unit IN ('record', 'patient')), "
        "created_at TEXT NOT NULL, created_by TEXT NOT NULL, description TEXT NOT NULL DEFAULT '')"),
    "runs": (
        "CREATE TABLE runs(run_id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id), status TEXT NOT NULL CHECK (status IN "
        "('running', 'finished', 'stopped', 'failed', 'interrupted')), unit TEXT NOT NULL CHECK (unit IN "
        "('record', 'patient')), sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1), "
        "noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0), max_grad_norm REAL NOT NULL, "
        "group_size INTEGER NOT NULL CHECK (group_size >= 1), reserved_steps INTEGER NOT NULL, "
        "steps_taken INTEGER NOT NULL DEFAULT 0 CHECK (steps_taken >= 0 AND steps_taken <= reserved_steps), "
        "started_at TEXT NOT NULL, finished_at TEXT, user TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
        "note TEXT NOT NULL DEFAULT '', resumes INTEGER REFERENCES runs(run_id), "
        "sampling TEXT NOT NULL DEFAULT 'poisson', noise_seeded INTEGER CHECK (noise_seeded IN (0, 1)))"),
    # the hash chain: every registration of a data set, start and end of a run is one event, never changed
    "events": ("CREATE TABLE events(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL, "
               "prev TEXT NOT NULL, hash TEXT NOT NULL)"),
}

INDEXES = {"runs_by_dataset": "CREATE INDEX runs_by_dataset ON runs(dataset_id, status)"}


def _refuse(message: str) -> str:
    return f"BEGIN SELECT RAISE(ABORT, 'privacy ledger: {message}'); END"


# append-only: nothing is deleted or replaced, budgets and mechanisms never change, an ended run stays as it ended
TRIGGERS = {
    "datasets_keep": f"CREATE TRIGGER datasets_keep BEFORE DELETE ON datasets {_refuse('data sets are never deleted')}",
    "datasets_fixed": (
        f"CREATE TRIGGER datasets_fixed BEFORE UPDATE ON datasets {_refuse('a recorded budget never changes')}"),
    "datasets_no_replace": (
        "CREATE TRIGGER datasets_no_replace BEFORE INSERT ON datasets WHEN EXISTS "
        f"(SELECT 1 FROM datasets WHERE dataset_id = NEW.dataset_id) {_refuse('a recorded budget is never replaced')}"),
    "runs_keep": f"CREATE TRIGGER runs_keep BEFORE DELETE ON runs {_refuse('runs are never deleted')}",
    "runs_no_replace": (
        "CREATE TRIGGER runs_no_replace BEFORE INSERT ON runs WHEN EXISTS "
        f"(SELECT 1 FROM runs WHERE run_id = NEW.run_id) {_refuse('a run is never replaced')}"),
    "runs_append_only": (
        "CREATE TRIGGER runs_append_only BEFORE UPDATE ON runs WHEN OLD.status != 'running' "
        "OR NEW.steps_taken < OLD.steps_taken OR NEW.reserved_steps != OLD.reserved_steps "
        "OR NEW.dataset_id != OLD.dataset_id OR NEW.unit != OLD.unit OR NEW.sample_rate != OLD.sample_rate "
        "OR NEW.noise_multiplier != OLD.noise_multiplier OR NEW.group_size != OLD.group_size "
        "OR NEW.started_at != OLD.started_at OR NEW.pid != OLD.pid OR NEW.host != OLD.host "
        "OR NEW.sampling != OLD.sampling OR NEW.noise_seeded IS NOT OLD.noise_seeded "
        f"{_refuse('only a running run is updated, and only forward')}"),
    "events_keep": f"CREATE TRIGGER events_keep BEFORE DELETE ON events {_refuse('events are never deleted')}",
    "events_fixed": f"CREATE TRIGGER events_fixed BEFORE UPDATE ON events {_refuse('events never change')}",
    "events_no_replace": (
        "CREATE TRIGGER events_no_replace BEFORE INSERT ON events WHEN EXISTS "
        f"(SELECT 1 FROM events WHERE seq = NEW.seq) {_refuse('events are never replaced')}"),
    "meta_keep": f"CREATE TRIGGER meta_keep BEFORE DELETE ON meta {_refuse('ledger metadata is never deleted')}",
}

STATEMENTS = (*TABLES.values(), *INDEXES.values(), *TRIGGERS.values())


def create_schema(con: sqlite3.Connection) -> None:
    """Create every table, index and trigger (in a new, empty ledger file)."""
    for statement in STATEMENTS:
        con.execute(statement)


def schema_version(con: sqlite3.Connection) -> int | None:
    """The ledger's ``schema_version`` (``None`` when the file holds no ledger metadata)."""
    if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return None
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return None if row is None else int(row[0])
    except ValueError:
        return None


def schema_problems(con: sqlite3.Connection) -> list[str]:
    """What differs from the schema: a table, index or trigger missing, altered, or a trigger added."""
    found = {(r[0], r[1]): r[2] for r in con.execute("SELECT type, name, sql FROM sqlite_master")}
    problems = []
    for kind, expected in (("table", TABLES), ("index", INDEXES), ("trigger", TRIGGERS)):
        for name, sql in expected.items():
            if (kind, name) not in found:
                problems.append(f"{kind} {name} is missing (dropped)")
            elif found[(kind, name)] != sql:
                problems.append(f"{kind} {name} was altered (its definition differs from the ledger's)")
    extra = sorted(name for kind, name in found if kind in ("trigger", "view") and name not in TRIGGERS)
    problems += [f"trigger or view {name} was added" for name in extra]
    return problems
