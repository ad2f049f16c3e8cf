"""SQLite keyvault store: the embedded default (one file, WAL, ``synchronous=FULL``).

Each thread gets its own connection (sqlite3 connections are not shareable across
threads); every transaction starts with ``BEGIN IMMEDIATE``, which takes the database's
write lock up front, so writers from any number of threads or processes run one at a
time and the audit chain cannot fork. ``busy_timeout`` makes a writer wait for the lock
instead of failing. ``secure_delete`` overwrites deleted rows, so crypto-shredded key
material does not linger in free pages. Audit rows are protected by triggers that refuse
UPDATE and DELETE (the hash chain still catches anyone who drops the triggers).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from veil.services.common.sql import SQLITE, SqliteDatabase
from veil.services.keyvault.errors import StoreError
from veil.services.keyvault.store import StoreTx
from veil.services.keyvault.store_sql import SqlTx, finish_schema

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS kv_keys (
    name TEXT PRIMARY KEY,
    policy_json TEXT NOT NULL,
    latest_version INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    destroyed INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_key_versions (
    name TEXT NOT NULL REFERENCES kv_keys (name),
    version INTEGER NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (name, version)
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_signing_keys (
    kid TEXT PRIMARY KEY,
    wrapped_private BLOB NOT NULL,
    public_jwk_json TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    retired_us INTEGER
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_release_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    public_key BLOB NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped_private BLOB NOT NULL,
    created_us INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_used_jtis (
    jti TEXT PRIMARY KEY,
    expires_us INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_leases (
    instance_id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_commit_heads (
    instance_id TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    hash BLOB NOT NULL,
    genesis_hash BLOB NOT NULL,
    config_hash BLOB NOT NULL,
    signing_public_key BLOB NOT NULL,
    updated_us INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_audit_events (
    sequence INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    caller TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    previous_hash BLOB NOT NULL,
    hash BLOB NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_audit_tip (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    sequence INTEGER NOT NULL,
    hash BLOB NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_requests (
    request_id TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result_json TEXT,
    created_us INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS kv_audit_signatures (
    sequence INTEGER PRIMARY KEY,
    signature BLOB NOT NULL
)
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_no_update BEFORE UPDATE ON kv_audit_events
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_no_delete BEFORE DELETE ON kv_audit_events
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_append_at_tip BEFORE INSERT ON kv_audit_events
WHEN NOT EXISTS (
    SELECT 1 FROM kv_audit_tip WHERE id = 1 AND sequence + 1 = NEW.sequence AND hash = NEW.previous_hash
)
BEGIN SELECT RAISE(ABORT, 'an audit event must extend the tip'); END
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_signature_no_update BEFORE UPDATE ON kv_audit_signatures
BEGIN SELECT RAISE(ABORT, 'audit signatures are append-only'); END
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_signature_no_delete BEFORE DELETE ON kv_audit_signatures
BEGIN SELECT RAISE(ABORT, 'audit signatures are append-only'); END
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_tip_forward BEFORE UPDATE ON kv_audit_tip
WHEN NEW.id <> OLD.id OR NEW.sequence <> OLD.sequence + 1 OR NOT EXISTS (
    SELECT 1 FROM kv_audit_events
    WHERE sequence = NEW.sequence AND hash = NEW.hash AND previous_hash = OLD.hash
)
BEGIN SELECT RAISE(ABORT, 'the audit tip only moves forward onto the newest event'); END
    """,
    """
CREATE TRIGGER IF NOT EXISTS kv_audit_tip_no_delete BEFORE DELETE ON kv_audit_tip
BEGIN SELECT RAISE(ABORT, 'the audit tip cannot be deleted'); END
    """,
)


class SqliteStore:
    """:class:`~veil.services.keyvault.store.Store` in one SQLite file."""

    backend = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self._db = SqliteDatabase(path, busy_timeout_s=busy_timeout_s, secure_delete=True, error=StoreError)
        with self._db.create_schema() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            finish_schema(conn, SQLITE, missing_column=sqlite3.OperationalError)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._db.path

    @contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        with self._db.transaction("BEGIN IMMEDIATE") as conn:
            yield SqlTx(conn, SQLITE)

    def close(self) -> None:
        self._db.close()
