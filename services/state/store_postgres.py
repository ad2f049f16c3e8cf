"""PostgreSQL state store: the production store, selected by a ``postgresql://`` VEIL_STATE_DB.

All tables live in one schema (default ``veil_state``; tests use one schema per test and drop
it). Each thread has its own autocommit connection and opens explicit transactions: writes at
READ COMMITTED, where the primary key (instance_id, sequence) makes two writers appending to
one instance conflict instead of forking its log; reads at REPEATABLE READ, so a snapshot and
the entries after it come from one consistent view even while compaction runs.
``synchronous_commit`` is forced on per session: an acknowledged batch is on disk whatever
the server's default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from veil.services.common.sql import POSTGRES, PostgresDatabase
from veil.services.state.errors import SequenceConflict, StoreError
from veil.services.state.store_sql import SqlStateStore, Tx, schema_statements

DEFAULT_SCHEMA = "veil_state"
# Arbitrary constant: the advisory lock that serialises schema creation across replicas.
_SCHEMA_LOCK_ID = 0x7665696C7374  # "veilst"


class PostgresStore(SqlStateStore):
    """`StateStore` in a PostgreSQL schema."""

    backend = "postgres"
    dialect = POSTGRES

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, connect_timeout_s: int = 10) -> None:
        self._db = PostgresDatabase(
            dsn,
            schema=schema,
            connect_timeout_s=connect_timeout_s,
            synchronous_commit=True,
            error=StoreError,
            conflict=SequenceConflict,
        )
        self.schema = schema
        with self._db.create_schema(_SCHEMA_LOCK_ID) as conn:
            for statement in schema_statements(POSTGRES):
                conn.execute(statement.encode("utf-8"))

    @contextmanager
    def _transaction(self, *, read_only: bool) -> Iterator[Tx]:
        with self._db.transaction() as conn, conn.cursor() as cursor:
            if read_only:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield Tx(cursor, POSTGRES)

    def _write(self) -> AbstractContextManager[Tx]:
        return self._transaction(read_only=False)

    def _read(self) -> AbstractContextManager[Tx]:
        return self._transaction(read_only=True)

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests and teardown only)."""
        self._db.drop_schema()

    def close(self) -> None:
        self._db.close()
