"""SQLite state store: the embedded default, one file (`<data_dir>/state.db`).

WAL journal with ``synchronous=FULL``: a commit returns only once the WAL is fsynced, so an
acknowledged batch survives power loss, and readers never block the writer. Each thread has
its own connection (sqlite3 connections are not shareable across threads). Writes start with
``BEGIN IMMEDIATE`` (the write lock up front, so two writers cannot interleave a read-check
and an insert); reads run in a deferred transaction, which in WAL mode is one consistent
snapshot.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from services.state.errors import SequenceConflict, StoreError
from services.state.store_sql import SQLITE, SqlStateStore, Tx, schema_statements

DEFAULT_FILE_NAME = "state.db"


class SqliteStore(SqlStateStore):
    """`StateStore` in one SQLite file."""

    backend = "sqlite"
    dialect = SQLITE

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._connection()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"SQLite at {path} refused WAL mode (got {mode})")
            with self._write() as tx:
                for statement in schema_statements(blob="BLOB", integer="INTEGER"):
                    tx.run(statement)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite state store at {path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are opened and committed explicitly.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Tx]:
        conn = self._connection()
        try:
            conn.execute(begin)
            try:
                yield Tx(conn.cursor(), SQLITE)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise SequenceConflict(f"SQLite constraint: {exc}") from exc
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"SQLite error: {type(exc).__name__}: {exc}") from exc

    def _write(self) -> AbstractContextManager[Tx]:
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[Tx]:
        return self._transaction("BEGIN")

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()
