"""PostgreSQL keyvault store: the production store that keyvault replicas share.

All tables live in one schema (default ``veil_keyvault``; tests use a schema per test so
parallel runs cannot collide). Each thread gets its own autocommit connection and runs
explicit transactions at READ COMMITTED; correctness under concurrent replicas comes
from the statements themselves: ``INSERT ... ON CONFLICT DO NOTHING`` for insert-if-absent,
``UPDATE ... WHERE sequence = expected`` for the commit-head compare-and-set,
``SELECT ... FOR UPDATE`` on key rows and on the single audit-tip row (which serialises
audit appends, so the hash chain cannot fork). Schema creation is guarded by a
transaction-scoped advisory lock so replicas starting together do not race. Audit rows and
their tip signatures are protected by triggers that refuse UPDATE, DELETE and TRUNCATE; the
tip only moves forward by one onto an event that links to it. A table's owner can drop its
triggers, so :mod:`veil.services.keyvault.audit_owner` hands the audit tables (and the schema)
to a separate role, leaving the service role SELECT and INSERT (and the trigger-checked tip
UPDATE). None of this stops the database superuser: the signed tips do (see
:mod:`veil.services.keyvault.audit`).

Crypto-shredding note: PostgreSQL keeps deleted tuples until VACUUM and in WAL archives
and backups; destroyed key material (KEK-wrapped) is gone from the live tables at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from veil.services.common.sql import POSTGRES, PostgresDatabase
from veil.services.keyvault.errors import StoreError
from veil.services.keyvault.store import StoreTx
from veil.services.keyvault.store_sql import SqlTx, finish_schema

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
CREATE TABLE IF NOT EXISTS kv_leases (
    instance_id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_us BIGINT NOT NULL,
    updated_us BIGINT NOT NULL
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
CREATE TABLE IF NOT EXISTS kv_requests (
    request_id TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result_json TEXT,
    created_us BIGINT NOT NULL
)
    """,
)

#: The audit tables: created by the service on a fresh schema, or by the audit owner's migration
#: (:mod:`veil.services.keyvault.audit_owner`), after which the service may only read and append.
AUDIT_TABLES = ("kv_audit_events", "kv_audit_signatures", "kv_audit_tip")
AUDIT_FUNCTIONS = ("kv_audit_append_only()", "kv_audit_append_at_tip()", "kv_audit_tip_forward()")

AUDIT_DDL = (
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
CREATE TABLE IF NOT EXISTS kv_audit_signatures (
    sequence BIGINT PRIMARY KEY,
    signature BYTEA NOT NULL
)
    """,
    # The functions pin the search_path they were created with: a caller cannot point them at
    # look-alike tables in another schema.
    """
CREATE OR REPLACE FUNCTION kv_audit_append_only() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only (% on %)', TG_OP, TG_TABLE_NAME;
END
$$
    """,
    """
CREATE OR REPLACE FUNCTION kv_audit_append_at_tip() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM kv_audit_tip WHERE id = 1 AND sequence + 1 = NEW.sequence AND hash = NEW.previous_hash
    ) THEN
        RAISE EXCEPTION 'an audit event must extend the tip';
    END IF;
    RETURN NEW;
END
$$
    """,
    """
CREATE OR REPLACE FUNCTION kv_audit_tip_forward() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'the audit tip cannot be deleted';
    END IF;
    IF NEW.id <> OLD.id OR NEW.sequence <> OLD.sequence + 1 OR NOT EXISTS (
        SELECT 1 FROM kv_audit_events
        WHERE sequence = NEW.sequence AND hash = NEW.hash AND previous_hash = OLD.hash
    ) THEN
        RAISE EXCEPTION 'the audit tip only moves forward onto the newest event';
    END IF;
    RETURN NEW;
END
$$
    """,
    """
CREATE OR REPLACE TRIGGER kv_audit_no_change BEFORE UPDATE OR DELETE ON kv_audit_events
    FOR EACH ROW EXECUTE FUNCTION kv_audit_append_only()
    """,
    """
CREATE OR REPLACE TRIGGER kv_audit_extends_tip BEFORE INSERT ON kv_audit_events
    FOR EACH ROW EXECUTE FUNCTION kv_audit_append_at_tip()
    """,
    """
CREATE OR REPLACE TRIGGER kv_audit_signature_no_change BEFORE UPDATE OR DELETE ON kv_audit_signatures
    FOR EACH ROW EXECUTE FUNCTION kv_audit_append_only()
    """,
    """
CREATE OR REPLACE TRIGGER kv_audit_tip_moves_forward BEFORE UPDATE OR DELETE ON kv_audit_tip
    FOR EACH ROW EXECUTE FUNCTION kv_audit_tip_forward()
    """,
    # TRUNCATE skips row triggers: statement triggers refuse it on every audit table.
    *(
        f"""
CREATE OR REPLACE TRIGGER kv_audit_no_truncate BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION kv_audit_append_only()
    """
        for table in AUDIT_TABLES
    ),
)

# Whether the connected role owns the audit tables (or they do not exist yet): only then does the
# service (re)create their guards; after the migration they belong to the audit owner.
_OWNS_AUDIT = (
    "SELECT coalesce(bool_and(pg_has_role(current_user, c.relowner, 'USAGE')), true) FROM pg_class c "
    "WHERE c.oid = to_regclass('kv_audit_events')"
)


class PostgresStore:
    """:class:`~veil.services.keyvault.store.Store` in a PostgreSQL schema."""

    backend = "postgres"

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, connect_timeout_s: int = 10) -> None:
        self._db = PostgresDatabase(dsn, schema=schema, connect_timeout_s=connect_timeout_s, error=StoreError)
        with self._db.create_schema(_SCHEMA_LOCK_ID) as conn:
            for statement in _TABLES:
                conn.execute(statement.encode("utf-8"))
            owns_audit = conn.execute(_OWNS_AUDIT).fetchone()
            if owns_audit is not None and owns_audit[0]:
                for statement in AUDIT_DDL:
                    conn.execute(statement.encode("utf-8"))
            finish_schema(conn, POSTGRES, missing_column=psycopg.errors.UndefinedColumn)

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
