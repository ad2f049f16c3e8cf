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

import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import psycopg
from psycopg import sql

from services.state.errors import SequenceConflict, StoreError
from services.state.store_sql import POSTGRES, SqlStateStore, Tx, schema_statements

DEFAULT_SCHEMA = "veil_state"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Arbitrary constant: the advisory lock that serialises schema creation across replicas.
_SCHEMA_LOCK_ID = 0x7665696C7374  # "veilst"

Connection = psycopg.Connection[tuple[object, ...]]


class PostgresStore(SqlStateStore):
    """`StateStore` in a PostgreSQL schema."""

    backend = "postgres"
    dialect = POSTGRES

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, connect_timeout_s: int = 10) -> None:
        if not _SCHEMA_RE.match(schema):
            raise StoreError(f"invalid PostgreSQL schema name {schema!r}")
        self._dsn = dsn
        self.schema = schema
        self._connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                for statement in schema_statements(blob="BYTEA", integer="BIGINT"):
                    conn.execute(statement.encode("utf-8"))
        except psycopg.Error as exc:
            raise StoreError(f"cannot create the PostgreSQL state schema {schema!r}: {exc}") from exc

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            conn = None  # a dropped connection is replaced, not reused
        if conn is None:
            try:
                conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._connect_timeout_s)
                # Unqualified table names resolve to our schema only.
                conn.execute("SELECT set_config('search_path', %s, false)", (self.schema,))
                conn.execute("SET synchronous_commit = on")
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to PostgreSQL: {exc}") from None
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _transaction(self, *, read_only: bool) -> Iterator[Tx]:
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cursor:
                if read_only:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield Tx(cursor, POSTGRES)
        except psycopg.errors.IntegrityError as exc:
            raise SequenceConflict(f"PostgreSQL constraint: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}: {exc}") from exc

    def _write(self) -> AbstractContextManager[Tx]:
        return self._transaction(read_only=False)

    def _read(self) -> AbstractContextManager[Tx]:
        return self._transaction(read_only=True)

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests and teardown only)."""
        conn = self._connection()
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()
