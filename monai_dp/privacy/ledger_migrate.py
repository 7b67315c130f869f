"""Migrate a privacy ledger of schema version 1 (no hash chain) to a new file of the current schema.

The old file is only read, never changed: it stays as the record of what was migrated. The new ledger chains
the old rows as they are, so check them (``monai-dp ledger show``) before migrating; a version-1 ledger could be
rewritten without trace, which is why version 2 exists. What version 1 did not record is marked so:
``sampling = 'unrecorded'`` and ``noise_seeded = NULL``. A run still ``running`` in the old file cannot go on
writing to the new one: it is migrated as ``interrupted`` and charged its whole reservation (a safe upper bound
of what its process may still take).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from monai_dp.privacy import ledger_file
from monai_dp.privacy.ledger_chain import ChainState, append_event, start_chain, verify
from monai_dp.privacy.ledger_store import now
from monai_dp.privacy.ledger_schema import create_schema, schema_version
from monai_dp.utils.validation import error_message

__all__ = ["migrate_ledger"]

_V1_RUN_COLUMNS = ("run_id", "dataset_id", "status", "unit", "sample_rate", "noise_multiplier", "max_grad_norm",
                   "group_size", "reserved_steps", "steps_taken", "started_at", "finished_at", "user", "host", "pid",
                   "note", "resumes")
_V1_DATASET_COLUMNS = ("dataset_id", "epsilon", "delta", "unit", "created_at", "created_by", "description")


def _read_v1(path: Path) -> tuple[list[dict], list[dict]]:
    con = ledger_file.connect(path, 30.0, read_only=True)
    try:
        version = schema_version(con)
        if version != 1:
            fix = ("It already has a hash chain; nothing to migrate." if version == 2 else
                   "Only ledgers of schema version 1 are migrated.")
            raise ValueError(error_message("ledger schema_version", "1 to be migrated", version, fix))
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is not None:
            raise ValueError(error_message("ledger", "a schema-version-1 ledger (without an events table)",
                                           str(path), "It has an events table: it is a newer ledger whose "
                                           "schema_version was changed; do not migrate it."))
        datasets = [dict(r) for r in con.execute(
            f"SELECT {', '.join(_V1_DATASET_COLUMNS)} FROM datasets ORDER BY created_at, dataset_id")]
        runs = [dict(r) for r in con.execute(f"SELECT {', '.join(_V1_RUN_COLUMNS)} FROM runs ORDER BY run_id")]
    finally:
        con.close()
    return datasets, runs


def _populate(con: sqlite3.Connection, datasets: list[dict], runs: list[dict], source: Path) -> None:
    create_schema(con)
    start_chain(con, now(), migrated_from_schema=1, migrated_from=source.name)
    for ds in datasets:
        con.execute(f"INSERT INTO datasets({', '.join(ds)}) VALUES ({', '.join('?' * len(ds))})", tuple(ds.values()))
        append_event(con, "dataset", dict(con.execute("SELECT * FROM datasets WHERE dataset_id = ?",
                                                      (ds["dataset_id"],)).fetchone()))
    for run in runs:
        run = dict(run, sampling="unrecorded", noise_seeded=None)
        if run["status"] == "running":
            run.update(status="interrupted", finished_at=now(), steps_taken=run["reserved_steps"],
                       note=(run["note"] + " [migrated while running: charged its whole reservation]").strip())
        con.execute(f"INSERT INTO runs({', '.join(run)}) VALUES ({', '.join('?' * len(run))})", tuple(run.values()))
        append_event(con, "run", dict(con.execute("SELECT * FROM runs WHERE run_id = ?",
                                                  (run["run_id"],)).fetchone()))


def migrate_ledger(old: str | os.PathLike, new: str | os.PathLike) -> ChainState:
    """Write the version-1 ledger ``old`` as a new, hash-chained ledger ``new`` (which must not exist yet)."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(error_message("ledger", "an existing ledger file", str(old)))
    ledger_file.check_not_emptied(old)
    if new.exists():
        raise FileExistsError(error_message("output", "a path that does not exist yet", str(new),
                                            "The migration writes a new file and never overwrites one."))
    if not new.parent.is_dir():
        raise FileNotFoundError(error_message("output", "a file in an existing folder", str(new)))
    datasets, runs = _read_v1(old)
    if not ledger_file.create_file(new, 30.0, lambda con: _populate(con, datasets, runs, old)):
        raise FileExistsError(error_message("output", "a path that does not exist yet", str(new),
                                            "Another process created it during the migration."))
    con = ledger_file.connect(new, 30.0, read_only=True)
    try:
        return verify(con, new)
    finally:
        con.close()
