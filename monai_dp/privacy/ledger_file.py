"""The privacy ledger's file: created whole or not at all, opened for writing or read-only, copied safely.

- A new ledger is built in a temporary file beside the target and linked into place only once it holds its
  tables and genesis event, so a ledger file never exists empty: an empty file at a ledger's path is an emptied
  ledger, and refused (:func:`check_not_emptied`).
- Read-only ledgers (no write permission on the file or its folder, e.g. ``chmod 0444`` or an archive) open
  with ``mode=ro``, and as ``immutable`` when no ``-wal`` file shows a writer (SQLite could not create its
  ``-shm`` file there).
- :func:`backup_file` copies through SQLite's online backup API: a plain copy of the ``.db`` misses every commit
  still in its ``-wal`` file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

from monai_dp.utils.errors import LedgerIntegrityError
from monai_dp.utils.validation import error_message

__all__ = ["backup_file", "check_not_emptied", "connect", "create_file", "writable_problem"]

logger = logging.getLogger(__name__)


def check_not_emptied(path: Path) -> None:
    """Refuse a 0-byte file at a ledger's path: ledgers are never created empty, so it was emptied."""
    if path.is_file() and path.stat().st_size == 0:
        raise LedgerIntegrityError(
            f"Privacy ledger {str(path)!r} is an empty file (0 bytes). A ledger is never created empty, so this one "
            "was emptied (truncated, or overwritten by a failed copy); nothing is trained on it. Restore it from a "
            "backup (`monai-dp ledger backup`); only if no ledger ever lived there, delete the file and create a "
            f"new one with `monai-dp ledger init --ledger {path} ...`.")


def writable_problem(path: Path) -> str | None:
    """Why ``path`` (an existing ledger) cannot be written to, or ``None``.

    A file or folder without any write permission bit counts as read-only even for a user (root) who could
    write to it anyway: it was made read-only on purpose.
    """
    for target, what in ((path, "file"), (path.parent, "folder")):
        if not target.stat().st_mode & 0o222 or not os.access(target, os.W_OK):
            return f"its {what} {str(target)!r} is read-only"
    return None


def _pragmas(con: sqlite3.Connection, timeout: float, read_only: bool) -> str:
    con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    if read_only:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # is it a database at all?
        return "wal"
    mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    con.execute("PRAGMA synchronous = FULL")
    con.execute("PRAGMA foreign_keys = ON")
    return mode


def connect(path: Path, timeout: float, read_only: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with ``sqlite3.Row`` rows."""
    read_only = read_only and writable_problem(path) is not None  # else SQLite tidies its -wal, -shm on close
    if read_only:
        wal = path.with_name(path.name + "-wal")
        immutable = not (wal.is_file() and wal.stat().st_size > 0)  # no writer has it open
        uri = path.resolve().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
        con = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    else:
        con = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    con.row_factory = sqlite3.Row
    try:
        mode = _pragmas(con, timeout, read_only)
    except sqlite3.DatabaseError as err:
        con.close()
        raise ValueError(error_message("path", "a privacy ledger (SQLite) file", str(path))) from err
    if mode.lower() != "wal":
        logger.warning("Privacy ledger %s: WAL journal unavailable (got %r); using it with a rollback journal.",
                       path, mode)
    return con


def _publish(tmp: Path, path: Path) -> bool:
    """Move the finished file ``tmp`` to ``path`` unless ``path`` exists (then ``False``); ``tmp`` is removed."""
    try:
        os.link(tmp, path)  # atomic, and never replaces an existing file
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def create_file(path: Path, timeout: float, populate: Callable[[sqlite3.Connection], None]) -> bool:
    """Create the ledger file ``path`` whole: ``populate`` writes its tables and chain in one transaction.

    ``False`` if another process created ``path`` first (its ledger is kept).
    """
    tmp = _temporary(path)
    try:
        con = connect(tmp, timeout)
    except sqlite3.OperationalError as err:  # cannot create a file in that folder
        raise PermissionError(error_message("path", "in a folder where a new ledger can be created", str(path),
                                            f"SQLite could not create a file there ({err}).")) from err
    try:
        con.execute("BEGIN IMMEDIATE")
        populate(con)
        con.execute("COMMIT")
    finally:
        con.close()  # checkpoints the -wal into the file and removes it
    return _publish(tmp, path)


def backup_file(con: sqlite3.Connection, output: Path, check: Callable[[sqlite3.Connection], object]) -> object:
    """Copy the database of ``con`` to the new file ``output`` (online backup API); ``check`` the copy first."""
    if output.exists():
        raise FileExistsError(error_message("output", "a path that does not exist yet", str(output),
                                            "A backup never overwrites a file."))
    if not output.parent.is_dir():
        raise FileNotFoundError(error_message("output", "a file in an existing folder", str(output)))
    tmp = _temporary(output)
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        con.backup(dst)
        dst.row_factory = sqlite3.Row
        result = check(dst)
    except BaseException:
        dst.close()
        tmp.unlink(missing_ok=True)
        raise
    dst.close()
    if not _publish(tmp, output):
        raise FileExistsError(error_message("output", "a path that does not exist yet", str(output),
                                            "Another process created it during the backup."))
    return result
