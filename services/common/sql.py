"""SQL plumbing shared by the keyvault and state stores.

The dialects, per-thread connections to SQLite and PostgreSQL, explicit transactions, and
the translation of driver errors into the store's own exceptions: ``conflict`` for a
constraint violation when the store has such a class, ``error`` otherwise. Each store keeps
its own schema, queries and exception classes.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psycopg
from psycopg import sql


class Cursor(Protocol):
    """The part of a DB-API cursor the stores use (sqlite3 and psycopg both fit)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, query: Any, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, query: Any, params: Sequence[Sequence[Any]], /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The part of a DB-API connection the stores use (sqlite3 and psycopg both fit)."""

    def execute(self, query: Any, params: Sequence[Any] = ..., /) -> Any: ...


@dataclass(frozen=True)
class Dialect:
    """What differs between the engines' statements."""

    name: str
    #: The parameter marker that replaces ``?``.
    param: str
    #: Column types for bytes and for 64-bit integers.
    blob: str
    integer: str
    #: Appended to a SELECT that must hold its rows until commit.
    lock_suffix: str

    def sql(self, statement: str) -> str:
        """``statement`` with this dialect's parameter markers."""
        return statement if self.param == "?" else statement.replace("?", self.param)


# No row locks in SQLite: BEGIN IMMEDIATE already serialises the writers.
SQLITE = Dialect(name="sqlite", param="?", blob="BLOB", integer="INTEGER", lock_suffix="")
POSTGRES = Dialect(name="postgres", param="%s", blob="BYTEA", integer="BIGINT", lock_suffix=" FOR UPDATE")

PgConnection = psycopg.Connection[tuple[object, ...]]
_C = TypeVar("_C", sqlite3.Connection, PgConnection)


class _PerThread(Generic[_C]):
    """One connection per thread, all closed by :meth:`close`; driver errors become the store's."""

    def __init__(self, error: type[Exception], conflict: type[Exception] | None) -> None:
        self._error = error
        self._conflict = conflict
        self._local = threading.local()
        self._connections: list[_C] = []
        self._lock = threading.Lock()

    def _thread_connection(self) -> _C | None:
        conn: _C | None = getattr(self._local, "conn", None)
        return conn

    def _keep(self, conn: _C) -> _C:
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    @contextmanager
    def _closed_on_failure(self, driver_error: type[Exception], what: str) -> Iterator[None]:
        """Schema creation: any failure closes every connection (none is left mid-transaction
        for a later call); a driver error becomes ``error(f"{what}: ...")``."""
        try:
            yield
        except driver_error as exc:
            self.close()
            raise self._error(f"{what}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _translate(self, exc: Exception, engine: str, *, constraint: bool) -> Exception:
        if constraint and self._conflict is not None:
            return self._conflict(f"{engine} constraint: {exc}")
        return self._error(f"{engine} error: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Close every connection any thread opened (a later call opens a new one)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()


class SqliteDatabase(_PerThread[sqlite3.Connection]):
    """One SQLite file: per-thread connections, ``busy_timeout``, ``synchronous=FULL``, foreign keys.

    ``secure_delete`` overwrites deleted rows, so deleted secrets do not linger in free pages.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float,
        secure_delete: bool = False,
        error: type[Exception],
        conflict: type[Exception] | None = None,
    ) -> None:
        super().__init__(error, conflict)
        self.path = path
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._secure_delete = secure_delete

    def connection(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn = self._thread_connection()
        if conn is None:
            # isolation_level=None: transactions are opened and committed explicitly.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if self._secure_delete:
                conn.execute("PRAGMA secure_delete=ON")
            conn = self._keep(conn)
        return conn

    @contextmanager
    def create_schema(self) -> Iterator[sqlite3.Connection]:
        """The first write transaction, in which the caller creates its tables.

        Switches the file to WAL journaling first. Any failure closes every connection; a
        driver error becomes ``error("cannot open SQLite database ...")``.
        """
        with self._closed_on_failure(sqlite3.Error, f"cannot open SQLite database {self.path}"):
            conn = self.connection()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise self._error(f"SQLite database {self.path} cannot use WAL journaling (got {mode})")
            with _explicit(conn, "BEGIN IMMEDIATE"):
                yield conn

    @contextmanager
    def transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """A transaction opened by ``begin``: committed on normal exit, rolled back on an exception.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so writers run one at a time
        (``busy_timeout`` makes them wait); a deferred ``BEGIN`` reads one WAL snapshot.
        """
        conn = self.connection()
        try:
            with _explicit(conn, begin):
                yield conn
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._translate(exc, "SQLite", constraint=isinstance(exc, sqlite3.IntegrityError)) from exc


@contextmanager
def _explicit(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")  # \Z: "$" passes a final newline


class PostgresDatabase(_PerThread[PgConnection]):
    """One schema of a PostgreSQL database: per-thread autocommit connections, explicit transactions.

    ``synchronous_commit`` forces the setting on per session, whatever the server's default.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        connect_timeout_s: int,
        synchronous_commit: bool = False,
        error: type[Exception],
        conflict: type[Exception] | None = None,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise error(f"invalid PostgreSQL schema name {schema!r}")
        super().__init__(error, conflict)
        self.schema = schema
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._synchronous_commit = synchronous_commit

    def connection(self) -> PgConnection:
        """This thread's connection; a dropped one is replaced, not reused."""
        conn = self._thread_connection()
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._connect_timeout_s)
            # Unqualified table names resolve to our schema only.
            conn.execute("SELECT set_config('search_path', %s, false)", (self.schema,))
            if self._synchronous_commit:
                conn.execute("SET synchronous_commit = on")
        except psycopg.Error as exc:
            raise self._error(f"cannot connect to PostgreSQL: {exc}") from None
        return self._keep(conn)

    @contextmanager
    def create_schema(self, lock_id: int) -> Iterator[PgConnection]:
        """A transaction that creates the schema, in which the caller creates its tables.

        The transaction-scoped advisory lock ``lock_id`` serialises replicas starting together.
        Any failure closes every connection; a driver error becomes ``error``.
        """
        with self._closed_on_failure(psycopg.Error, f"cannot create the PostgreSQL schema {self.schema!r}"):
            conn = self.connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                yield conn

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """A transaction (READ COMMITTED unless the caller sets otherwise): commit on normal exit."""
        conn = self.connection()
        try:
            with conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise self._translate(
                exc, "PostgreSQL", constraint=isinstance(exc, psycopg.IntegrityError)
            ) from exc

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests and teardown only)."""
        conn = self.connection()
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
