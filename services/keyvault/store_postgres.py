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

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from veil.services.common.sql import POSTGRES, PostgresDatabase
from veil.services.keyvault.errors import StoreError
from veil.services.keyvault.store import GENESIS_HASH, StoreTx
from veil.services.keyvault.store_sql import OUTDATED_SCHEMA, SCHEMA_PROBE, SqlTx

DEFAULT_SCHEMA = "veil_keyvault"
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
    genesis_hash BYTEA NOT NULL,
    config_hash BYTEA NOT NULL,
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
    """:class:`~veil.services.keyvault.store.Store` in a PostgreSQL schema."""

    backend = "postgres"

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, connect_timeout_s: int = 10) -> None:
        self._db = PostgresDatabase(dsn, schema=schema, connect_timeout_s=connect_timeout_s, error=StoreError)
        with self._db.create_schema(_SCHEMA_LOCK_ID) as conn:
            for statement in _TABLES:
                conn.execute(statement.encode("utf-8"))
            conn.execute(
                "INSERT INTO kv_audit_tip (id, sequence, hash) VALUES (1, 0, %s) ON CONFLICT (id) DO NOTHING",
                (GENESIS_HASH,),
            )
            try:
                conn.execute(SCHEMA_PROBE)
            except psycopg.errors.UndefinedColumn:
                raise StoreError(OUTDATED_SCHEMA) from None

    @property
    def schema(self) -> str:
        """The schema holding the tables."""
        return self._db.schema

    @contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        with self._db.transaction() as conn:
            yield SqlTx(conn, POSTGRES)

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests and teardown only)."""
        self._db.drop_schema()

    def close(self) -> None:
        self._db.close()
