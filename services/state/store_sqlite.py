"""SQLite state store: the embedded default, one file (`<data_dir>/state.db`).

WAL journal with ``synchronous=FULL``: a commit returns only once the WAL is fsynced, so an
acknowledged batch survives power loss, and readers never block the writer. Each thread has
its own connection (sqlite3 connections are not shareable across threads). Writes start with
``BEGIN IMMEDIATE`` (the write lock up front, so two writers cannot interleave a read-check
and an insert); reads run in a deferred transaction, which in WAL mode is one consistent
snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from veil.services.common.sql import SQLITE, SqliteDatabase
from veil.services.state.errors import SequenceConflict, StoreError
from veil.services.state.store_sql import SqlStateStore, Tx, schema_statements

DEFAULT_FILE_NAME = "state.db"


class SqliteStore(SqlStateStore):
    """`StateStore` in one SQLite file."""

    backend = "sqlite"
    dialect = SQLITE

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = SqliteDatabase(
            path, busy_timeout_s=busy_timeout_s, error=StoreError, conflict=SequenceConflict
        )
        with self._db.create_schema() as conn:
            for statement in schema_statements(SQLITE):
                conn.execute(statement)

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Tx]:
        with self._db.transaction(begin) as conn:
            yield Tx(conn.cursor(), SQLITE)

    def _write(self) -> AbstractContextManager[Tx]:
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[Tx]:
        return self._transaction("BEGIN")

    def close(self) -> None:
        self._db.close()
