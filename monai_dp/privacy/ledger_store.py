"""The privacy ledger's storage: one SQLite file, one connection per process, verified transactions.

:class:`LedgerStore` is what both :class:`~monai_dp.privacy.ledger.PrivacyLedger` (data sets, planning, reports)
and :class:`~monai_dp.privacy.ledger_run.LedgerRun` (step claims, the end of a run) read and write through. It
knows files, connections, transactions and verification (schema version, hash chain); it knows nothing of
budgets. Every transaction verifies the ledger first unless nothing but this connection changed it since it was
last verified (``PRAGMA data_version``). The one statement that runs outside a transaction is a running run's
write-ahead step claim (:meth:`LedgerStore.claim_step`): it must stay cheap, and it only ever counts up.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from monai_dp.privacy import ledger_file
from monai_dp.privacy.ledger_chain import ChainState, start_chain, verify
from monai_dp.privacy.ledger_schema import SCHEMA_VERSION, create_schema, schema_version
from monai_dp.utils.errors import LedgerIntegrityError
from monai_dp.utils.validation import check_positive, error_message

__all__ = ["BUSY_TIMEOUT_S", "LedgerStore", "now"]

BUSY_TIMEOUT_S = 30.0


def now() -> str:
    """The time stamp the ledger records (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LedgerStore:
    """The SQLite file ``path`` of a ledger, created whole if missing (unless ``create=False``) and verified.

    ``read_only=True`` opens a ledger that may not be written; :meth:`write` then raises ``PermissionError``, as
    does opening a read-only file without it. The connection is re-opened in a forked child (never used, never
    closed there: it is the parent's).
    """

    def __init__(self, path: str | os.PathLike, create: bool = True, timeout: float = BUSY_TIMEOUT_S,
                 read_only: bool = False):
        self.path = Path(path)
        self.timeout = check_positive("timeout", timeout)
        self.read_only = bool(read_only)
        if (self.read_only or not create) and not self.path.is_file():
            raise FileNotFoundError(error_message(
                "path", "an existing ledger file", str(self.path),
                f"Create it with `monai-dp ledger init --ledger {self.path} --dataset-id ID --epsilon E --delta D`."))
        if not self.path.parent.is_dir():
            raise FileNotFoundError(error_message("path", "a file in an existing folder", str(self.path),
                                                  "Create the folder first; the ledger does not create folders."))
        if not self.path.exists():
            ledger_file.create_file(self.path, self.timeout, self._populate_new)
        ledger_file.check_not_emptied(self.path)
        problem = None if self.read_only else ledger_file.writable_problem(self.path)
        if problem:
            raise PermissionError(error_message(
                "path", "a writable ledger to record runs in", str(self.path),
                f"{problem[0].upper()}{problem[1:]}; make it writable, or open it with read_only=True (as "
                "`monai-dp ledger show` does) to read it."))
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._inherited: list[sqlite3.Connection] = []
        self._verified_version: int | None = None
        with self.read():
            pass  # verified on opening

    @staticmethod
    def _populate_new(con: sqlite3.Connection) -> None:
        create_schema(con)
        start_chain(con, now())

    @property
    def connection(self) -> sqlite3.Connection:
        """This process's connection (autocommit mode: transactions are explicit, through :meth:`read`/:meth:`write`)."""
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:  # inherited through fork: never use it, never close it (it is the parent's)
                self._inherited.append(self._conn)
            self._conn, self._pid = ledger_file.connect(self.path, self.timeout, self.read_only), os.getpid()
            self._verified_version = None
        return self._conn

    def check(self, con: sqlite3.Connection, force: bool = False) -> ChainState | None:
        """Verify the ledger unless nothing but this connection changed it since it was last verified (or ``force``);
        the chain's state when it was verified, else ``None``."""
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # start the read snapshot first
        version = con.execute("PRAGMA data_version").fetchone()[0]
        if version == self._verified_version and not force:
            return None
        found = schema_version(con)
        if found is None and con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            raise LedgerIntegrityError(
                f"Privacy ledger {str(self.path)!r} holds no ledger (no tables): an emptied ledger, a ledger whose "
                "-wal file was lost before its first checkpoint, or another SQLite file. Nothing is trained on it; "
                "restore it from a backup (`monai-dp ledger backup`).")
        if found is not None and found < SCHEMA_VERSION:
            raise RuntimeError(error_message(
                "ledger schema_version", f"{SCHEMA_VERSION} (runs chained by hashes)", found,
                f"{self.path} was written by an older monai_dp; migrate it with `monai-dp ledger migrate --ledger "
                f"{self.path} --output NEW.db` and use NEW.db (the old file is left as it is)."))
        if found is not None and found > SCHEMA_VERSION:
            raise RuntimeError(error_message("ledger schema_version", f"at most {SCHEMA_VERSION}", found,
                                             f"{self.path} was written by a newer monai_dp; upgrade monai_dp."))
        state = verify(con, self.path)
        self._verified_version = version
        return state

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One read snapshot, verified; inside a transaction already open, that transaction."""
        con = self.connection
        if con.in_transaction:
            yield con
            return
        con.execute("BEGIN")
        try:
            self.check(con)
            yield con
        finally:
            if con.in_transaction:
                con.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, verified: one writer at a time across processes; rolled back on error."""
        if self.read_only:
            raise PermissionError(error_message("ledger", "opened without read_only=True to be written",
                                                str(self.path)))
        con = self.connection
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            if "readonly" not in str(err):
                raise
            raise PermissionError(error_message("path", "a writable ledger to record runs in", str(self.path),
                                                f"SQLite cannot write it ({err}).")) from err
        try:
            self.check(con)
            yield con
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        # every event (registration, start or end of a run) reaches the .db file itself at once: a lost -wal, or a
        # plain copy of the .db, then misses at most the step claims of running runs since their last event
        con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def claim_step(self, run_id: int) -> bool:
        """Count one more step of the running run ``run_id`` (committed at once, no verification: the write-ahead
        claim before every training step); ``False`` if it is not running or its reservation is used up."""
        cur = self.connection.execute(
            "UPDATE runs SET steps_taken = steps_taken + 1 WHERE run_id = ? AND status = 'running' "
            "AND steps_taken < reserved_steps", (run_id,))
        return cur.rowcount == 1

    def backup(self, output: str | os.PathLike) -> ChainState:
        """Copy the ledger to the new file ``output`` (SQLite's online backup API, ``-wal`` included), verified."""
        return ledger_file.backup_file(self.connection, Path(output), lambda con: verify(con, Path(output)))

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None
