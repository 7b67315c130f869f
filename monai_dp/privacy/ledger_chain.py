"""The privacy ledger's hash chain: every state change is an event, and the tables must equal their replay.

Events (table ``events``) are appended, never changed: ``genesis`` (the ledger's id and schema version),
``dataset`` (a registered budget, the whole row), ``run`` (a run as it starts: the whole row) and ``run_end``
(its status, end time and the steps it claimed). Event ``n`` carries ``hash = sha256(prev, n, kind, body)`` with
``prev`` the hash of event ``n - 1``; the last hash, the *head*, is kept in ``meta`` as well.

:func:`verify` recomputes the chain, checks the stored head, replays the events and compares the replay with the
``datasets`` and ``runs`` tables column by column. The one thing not chained step by step is the step count of a
run that is still running (claimed at every training step, it would make the chain as long as the training): it
may only lie between the last chained count and the run's reservation, and a running run counts its whole
reservation anyway; the count it ends with is chained by its ``run_end`` event.

A chain in the file cannot prove that nobody rewrote the whole file consistently; a copy of the head kept
elsewhere (the run report, an export) can: :func:`find_event` tells whether a head copy is still in the chain.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from monai_dp.privacy.ledger_schema import SCHEMA_VERSION, schema_problems, schema_version
from monai_dp.utils.errors import LedgerIntegrityError

__all__ = ["ChainState", "append_event", "find_event", "start_chain", "verify"]

GENESIS_PREV = "0" * 64
RUN_END_KEYS = ("status", "finished_at", "steps_taken")
_MAX_LISTED = 8  # problems named in one error message


class ChainState(NamedTuple):
    """A verified ledger: its head, number of events, data sets and runs (and where an expected head is)."""

    head: str
    events: int
    datasets: int
    runs: int
    expected_at: int | None = None  # the event whose hash is the head asked for by ``verify(expect_head=...)``


def canonical(body: dict) -> str:
    """The one JSON text of ``body`` that is hashed (sorted keys, no spaces; floats written exactly)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_hash(prev: str, seq: int, kind: str, body: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{kind}\n{body}".encode()).hexdigest()


def _meta(con: sqlite3.Connection, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def append_event(con: sqlite3.Connection, kind: str, body: dict) -> str:
    """Append one event after the stored head (inside the caller's write transaction); return the new head."""
    prev = _meta(con, "chain_head")
    seq = int(_meta(con, "chain_length")) + 1
    text = canonical(body)
    head = event_hash(prev, seq, kind, text)
    con.execute("INSERT INTO events(seq, kind, body, prev, hash) VALUES (?, ?, ?, ?, ?)", (seq, kind, text, prev, head))
    con.execute("UPDATE meta SET value = ? WHERE key = 'chain_head'", (head,))
    con.execute("UPDATE meta SET value = ? WHERE key = 'chain_length'", (str(seq),))
    return head


def start_chain(con: sqlite3.Connection, created_at: str, **extra: Any) -> str:
    """Write the metadata and the genesis event of a new ledger (its tables just created)."""
    ledger_id = uuid.uuid4().hex
    con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
        ("schema_version", str(SCHEMA_VERSION)), ("ledger_id", ledger_id), ("chain_head", GENESIS_PREV),
        ("chain_length", "0")])
    return append_event(con, "genesis", {"schema_version": SCHEMA_VERSION, "ledger_id": ledger_id,
                                         "created_at": created_at, **extra})


def find_event(con: sqlite3.Connection, head: str) -> int | None:
    """The number of the event whose hash is ``head`` (``None``: not in this ledger's chain)."""
    row = con.execute("SELECT seq FROM events WHERE hash = ?", (head.lower(),)).fetchone()
    return None if row is None else int(row[0])


def _fail(path: Path, problems: list[str]) -> LedgerIntegrityError:
    shown = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                      if len(problems) > _MAX_LISTED else [])
    return LedgerIntegrityError(
        f"Privacy ledger {str(path)!r} fails its integrity check; nothing is trained on it until it is restored:\n"
        + "\n".join(f"  - {p}" for p in shown)
        + "\nCompare it with a backup (`monai-dp ledger verify --ledger BACKUP`) and with the head printed in the "
        "last run report (`monai-dp ledger verify --ledger PATH --expect-head HEX`).")


def _replay_chain(con: sqlite3.Connection, problems: list[str]) -> tuple[dict, dict, dict, str, int]:
    """Check every link and hash; replay the events into data sets, runs and the chained step count of each run."""
    datasets: dict[str, dict] = {}
    runs: dict[int, dict] = {}
    chained_steps: dict[int, int] = {}
    prev, n = GENESIS_PREV, 0
    for seq, kind, body, link, stored in con.execute("SELECT seq, kind, body, prev, hash FROM events ORDER BY seq"):
        n += 1
        if seq != n:
            problems.append(f"table events: event {n} is missing (the next one is {seq})")
            n = seq
        if link != prev:
            problems.append(f"table events: event {seq} ({kind}) does not follow event {seq - 1} (chain broken)")
        if event_hash(link, seq, kind, body) != stored:
            problems.append(f"table events: event {seq} ({kind}) was changed (its hash does not match its content)")
        prev = stored
        if (seq == 1) != (kind == "genesis"):
            problems.append(f"table events: event {seq} is {kind!r}; the chain starts with one genesis event")
        try:
            data = json.loads(body)
        except ValueError:
            problems.append(f"table events: event {seq} ({kind}) is not JSON")
            continue
        try:
            _apply(seq, kind, data, datasets, runs, chained_steps, problems)
        except (KeyError, TypeError, AttributeError):
            problems.append(f"table events: event {seq} ({kind}) is malformed")
    if n == 0:
        problems.append("table events is empty (no genesis event)")
    return datasets, runs, chained_steps, prev, n


def _apply(seq: int, kind: str, data: dict, datasets: dict, runs: dict, chained_steps: dict,
           problems: list[str]) -> None:
    if kind == "dataset":
        datasets[data["dataset_id"]] = data
    elif kind == "run":
        runs[data["run_id"]] = data
        chained_steps[data["run_id"]] = data["steps_taken"]
    elif kind == "run_end":
        if runs.get(data["run_id"], {}).get("status") != "running":
            problems.append(f"table events: event {seq} ends run {data['run_id']!r}, which is not running then")
        else:
            runs[data["run_id"]].update({k: data[k] for k in RUN_END_KEYS})
            chained_steps[data["run_id"]] = data["steps_taken"]
    elif kind != "genesis":
        problems.append(f"table events: event {seq} has an unexpected kind {kind!r}")


def _compare(table: str, name: str, rows: dict, replayed: dict, chained_steps: dict, problems: list[str]) -> None:
    for key in sorted(rows.keys() - replayed.keys(), key=str):
        problems.append(f"table {table}: {name} {key!r} is not in the hash chain (inserted behind the ledger's back)")
    for key in sorted(replayed.keys() - rows.keys(), key=str):
        problems.append(f"table {table}: {name} {key!r} is missing (deleted or replaced)")
    for key in sorted(rows.keys() & replayed.keys(), key=str):
        row, want = rows[key], replayed[key]
        for col in sorted(row.keys() | want.keys()):
            have, expected = row.get(col), want.get(col)
            if col == "steps_taken" and want.get("status") == "running" and row.get("status") == "running":
                if isinstance(have, int) and chained_steps[key] <= have <= want["reserved_steps"]:
                    continue  # a running run claims steps between chained events
            if have != expected or type(have) is not type(expected):
                problems.append(f"table {table}: {name} {key!r}: {col} is {have!r}, the hash chain says {expected!r}")


def verify(con: sqlite3.Connection, path: Path) -> ChainState:
    """Check the schema, every link and hash of the chain, the stored head, and the tables against the replay.

    Raises :class:`~monai_dp.utils.errors.LedgerIntegrityError` naming the ledger and every difference found.
    """
    problems = schema_problems(con)
    if any(p.startswith(("table meta", "table events")) for p in problems):
        raise _fail(path, problems)
    version = schema_version(con)
    if version != SCHEMA_VERSION:
        problems.append(f"table meta: schema_version is {version!r}, expected {SCHEMA_VERSION}")
    datasets, runs, chained_steps, head, n = _replay_chain(con, problems)
    if _meta(con, "chain_head") != head or _meta(con, "chain_length") != str(n):
        problems.append(f"table meta: the stored head ({_meta(con, 'chain_head')}, {_meta(con, 'chain_length')} "
                        f"events) is not the last event of the chain ({head}, {n} events)")
    if "table datasets is missing (dropped)" not in problems:
        rows = {r["dataset_id"]: dict(r) for r in map(_row_dict, con.execute("SELECT * FROM datasets"))}
        _compare("datasets", "dataset", rows, datasets, {}, problems)
    if "table runs is missing (dropped)" not in problems:
        rows = {r["run_id"]: r for r in map(_row_dict, con.execute("SELECT * FROM runs"))}
        _compare("runs", "run", rows, runs, chained_steps, problems)
    if problems:
        raise _fail(path, problems)
    return ChainState(head, n, len(datasets), len(runs))


def _row_dict(row: sqlite3.Row | tuple) -> dict:
    return dict(row)
