"""PostgreSQL keyvault store: the production store that keyvault replicas share.

All tables live in one schema (default ``veil_keyvault``; tests use a schema per test so
parallel runs cannot collide). Each thread gets its own autocommit connection and runs
explicit transactions at READ COMMITTED; correctness under concurrent replicas comes
from the statements themselves: ``INSERT ... ON CONFLICT DO NOTHING`` for insert-if-absent,
``UPDATE ... WHERE sequence = expected`` for the commit-head compare-and-set,
``SELECT ... FOR UPDATE`` on key rows and on the single audit-tip row (which serialises
audit appends, so the hash chain cannot fork). Schema creation is guarded by a
transaction-scoped advisory lock so replicas starting together do not race. Audit rows
are protected by a trigger that refuses UPDATE and DELETE.

Crypto-shredding note: PostgreSQL keeps deleted tuples until VACUUM and in WAL archives
and backups; destroyed key material (KEK-wrapped) is gone from the live tables at once.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from services.keyvault.errors import StoreError
from services.keyvault.store import GENESIS_HASH, StoreTx
from services.keyvault.store_sql import POSTGRES, SqlTx

DEFAULT_SCHEMA = "veil_keyvault"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Arbitrary constant: the advisory lock that serialises schema creation across replicas.
_SCHEMA_LOCK_ID = 0x7665696C6B76  # "veilkv"

_TABLES = (
    """
CREATE TABLE IF NOT EXISTS kv_keys (
    name TEXT PRIMARY KEY,
    policy_json TEXT NOT NULL,
    latest_version BIGINT NOT NULL,
    created_us BIGINT NOT NULL,
    updated_us BIGINT NOT NULL,
    destroyed BOOLEAN NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_key_versions (
    name TEXT NOT NULL REFERENCES kv_keys (name),
    version BIGINT NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped BYTEA NOT NULL,
    created_us BIGINT NOT NULL,
    PRIMARY KEY (name, version)
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_signing_keys (
    kid TEXT PRIMARY KEY,
    wrapped_private BYTEA NOT NULL,
    public_jwk_json TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    retired_us BIGINT
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_release_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    public_key BYTEA NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped_private BYTEA NOT NULL,
    created_us BIGINT NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_used_jtis (
    jti TEXT PRIMARY KEY,
    expires_us BIGINT NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_commit_heads (
    instance_id TEXT PRIMARY KEY,
    sequence BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    signing_public_key BYTEA NOT NULL,
    updated_us BIGINT NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_audit_events (
    sequence BIGINT PRIMARY KEY,
    time_us BIGINT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    caller TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    previous_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_audit_tip (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    sequence BIGINT NOT NULL,
    hash BYTEA NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_requests (
    request_id TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result_json TEXT,
    created_us BIGINT NOT NULL
)
    """,
    """
CREATE OR REPLACE FUNCTION kv_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only';
END
$$
    """,
    """
CREATE OR REPLACE TRIGGER kv_audit_no_change BEFORE UPDATE OR DELETE ON kv_audit_events
    FOR EACH ROW EXECUTE FUNCTION kv_audit_append_only()
    """,
)


class PostgresStore:
    """:class:`~services.keyvault.store.Store` in a PostgreSQL schema."""

    backend = "postgres"

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, connect_timeout_s: int = 10) -> None:
        if not _SCHEMA_RE.match(schema):
            raise StoreError(f"invalid PostgreSQL schema name {schema!r}")
        self._dsn = dsn
        self._schema = schema
        self._connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._connections: list[psycopg.Connection[tuple[object, ...]]] = []
        self._lock = threading.Lock()
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def _create_schema(self) -> None:
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema)))
                for statement in _TABLES:
                    conn.execute(statement.encode("utf-8"))
                conn.execute(
                    "INSERT INTO kv_audit_tip (id, sequence, hash) VALUES (1, 0, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    (GENESIS_HASH,),
                )
        except psycopg.Error as exc:
            raise StoreError(f"cannot create the keyvault schema: {exc}") from exc

    @property
    def schema(self) -> str:
        """The schema holding the tables."""
        return self._schema

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        conn: psycopg.Connection[tuple[object, ...]] | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            conn = None  # a dropped connection is replaced, not reused
        if conn is None:
            try:
                conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._connect_timeout_s)
            except psycopg.OperationalError as exc:
                raise StoreError(f"cannot connect to PostgreSQL: {exc}") from None
            # Unqualified table names resolve to our schema only.
            conn.execute("SELECT set_config('search_path', %s, false)", (self._schema,))
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        conn = self._connection()
        try:
            with conn.transaction():
                yield SqlTx(conn, POSTGRES)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}: {exc}") from exc

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests and teardown only)."""
        conn = self._connection()
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self._schema)))

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()
