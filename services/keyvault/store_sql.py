"""The SQL shared by the SQLite and PostgreSQL stores: one :class:`SqlTx` over a DB-API connection.

Both engines accept the same statements (``INSERT ... ON CONFLICT DO NOTHING RETURNING``,
standard types); the dialect (:mod:`veil.services.common.sql`) differs only in the parameter
marker and in row locking. Statements are written with ``?`` markers and translated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from veil.services.common.sql import Connection, Cursor, Dialect
from veil.services.keyvault.errors import StoreError
from veil.services.keyvault.store import (
    GENESIS_HASH,
    AuditRecord,
    CommitHeadRecord,
    IdempotencyRecord,
    KeyRecord,
    KeyVersionRecord,
    LeaseRecord,
    ReleaseKeyRecord,
    SigningKeyRecord,
)

_SELECT_KEY = (
    "SELECT name, policy_json, latest_version, created_us, updated_us, destroyed FROM kv_keys WHERE name = ?"
)

_SELECT_AUDIT = (
    "SELECT e.sequence, e.time_us, e.action, e.outcome, e.caller, e.detail_json, e.previous_hash, e.hash, "
    "s.signature FROM kv_audit_events e LEFT JOIN kv_audit_signatures s ON s.sequence = e.sequence "
)


# Stores made before commit heads registered their genesis lack its columns: refuse them
# plainly rather than fail on the first head (no deployment predates it; recreate dev stores).
_SCHEMA_PROBE = "SELECT genesis_hash, config_hash FROM kv_commit_heads WHERE 1 = 0"
_OUTDATED_SCHEMA = (
    "the keyvault store predates genesis registration of commit heads (kv_commit_heads has no "
    "genesis_hash column); recreate it"
)


def finish_schema(conn: Connection, dialect: Dialect, *, missing_column: type[Exception]) -> None:
    """The last step of creating the tables, the same on both engines: the audit tip starts at
    genesis (once), and a store that predates genesis registration is refused (``missing_column``
    is the engine's error for an unknown column)."""
    conn.execute(
        dialect.sql(
            "INSERT INTO kv_audit_tip (id, sequence, hash) VALUES (1, 0, ?) ON CONFLICT (id) DO NOTHING"
        ),
        (GENESIS_HASH,),
    )
    try:
        conn.execute(_SCHEMA_PROBE)
    except missing_column:
        raise StoreError(_OUTDATED_SCHEMA) from None


class SqlTx:
    """:class:`~veil.services.keyvault.store.StoreTx` over one connection inside an open transaction."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cursor: Cursor = self._conn.execute(self._dialect.sql(sql), tuple(params))
        return cursor

    def _inserted(self, sql: str, params: Sequence[Any]) -> bool:
        """Run an ``INSERT ... ON CONFLICT DO NOTHING RETURNING``: True if it inserted the row."""
        return self._run(sql, params).fetchone() is not None

    # -- keys ----------------------------------------------------------------------------
    def get_key(self, name: str, *, lock: bool = False) -> KeyRecord | None:
        query = _SELECT_KEY + (self._dialect.lock_suffix if lock else "")
        row = self._run(query, (name,)).fetchone()
        return None if row is None else _key(row)

    def list_keys(self) -> list[KeyRecord]:
        rows = self._run(
            "SELECT name, policy_json, latest_version, created_us, updated_us, destroyed "
            "FROM kv_keys ORDER BY name"
        ).fetchall()
        return [_key(row) for row in rows]

    def insert_key(self, key: KeyRecord) -> bool:
        return self._inserted(
            "INSERT INTO kv_keys (name, policy_json, latest_version, created_us, updated_us, destroyed) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING RETURNING name",
            (key.name, key.policy_json, key.latest_version, key.created_us, key.updated_us, key.destroyed),
        )

    def update_key(self, key: KeyRecord) -> None:
        cursor = self._run(
            "UPDATE kv_keys SET policy_json = ?, latest_version = ?, updated_us = ?, destroyed = ? "
            "WHERE name = ?",
            (key.policy_json, key.latest_version, key.updated_us, key.destroyed, key.name),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"key {key.name!r} vanished during update")

    def insert_key_version(self, version: KeyVersionRecord) -> bool:
        return self._inserted(
            "INSERT INTO kv_key_versions (name, version, kek_id, wrapped, created_us) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name, version) DO NOTHING RETURNING version",
            (version.name, version.version, version.kek_id, version.wrapped, version.created_us),
        )

    def get_key_version(self, name: str, version: int) -> KeyVersionRecord | None:
        row = self._run(
            "SELECT name, version, kek_id, wrapped, created_us FROM kv_key_versions "
            "WHERE name = ? AND version = ?",
            (name, version),
        ).fetchone()
        if row is None:
            return None
        return KeyVersionRecord(
            name=row[0], version=int(row[1]), kek_id=row[2], wrapped=bytes(row[3]), created_us=int(row[4])
        )

    def delete_key_versions(self, name: str) -> int:
        return self._run("DELETE FROM kv_key_versions WHERE name = ?", (name,)).rowcount

    # -- signing keys --------------------------------------------------------------------
    def insert_signing_key(self, key: SigningKeyRecord) -> None:
        self._run(
            "INSERT INTO kv_signing_keys (kid, wrapped_private, public_jwk_json, created_us, retired_us) "
            "VALUES (?, ?, ?, ?, ?)",
            (key.kid, key.wrapped_private, key.public_jwk_json, key.created_us, key.retired_us),
        )

    def list_signing_keys(self) -> list[SigningKeyRecord]:
        rows = self._run(
            "SELECT kid, wrapped_private, public_jwk_json, created_us, retired_us "
            "FROM kv_signing_keys ORDER BY created_us, kid"
        ).fetchall()
        return [
            SigningKeyRecord(
                kid=row[0],
                wrapped_private=bytes(row[1]),
                public_jwk_json=row[2],
                created_us=int(row[3]),
                retired_us=None if row[4] is None else int(row[4]),
            )
            for row in rows
        ]

    def retire_signing_keys(self, *, except_kid: str, retired_us: int) -> int:
        return self._run(
            "UPDATE kv_signing_keys SET retired_us = ? WHERE retired_us IS NULL AND kid <> ?",
            (retired_us, except_kid),
        ).rowcount

    def delete_signing_keys_retired_before(self, cutoff_us: int) -> int:
        return self._run("DELETE FROM kv_signing_keys WHERE retired_us < ?", (cutoff_us,)).rowcount

    # -- the release-signing key ----------------------------------------------------------
    def get_release_key(self) -> ReleaseKeyRecord | None:
        row = self._run(
            "SELECT public_key, kek_id, wrapped_private, created_us FROM kv_release_key WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        return ReleaseKeyRecord(
            public_key=bytes(row[0]), kek_id=row[1], wrapped_private=bytes(row[2]), created_us=int(row[3])
        )

    def insert_release_key(self, key: ReleaseKeyRecord) -> bool:
        # One row (id = 1): a replica that loses the race waits for the winner's commit, then
        # gets no row back and reads the winner's key.
        return self._inserted(
            "INSERT INTO kv_release_key (id, public_key, kek_id, wrapped_private, created_us) "
            "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
            (key.public_key, key.kek_id, key.wrapped_private, key.created_us),
        )

    # -- token replay ----------------------------------------------------------------------
    def use_jti(self, jti: str, expires_us: int) -> bool:
        return self._inserted(
            "INSERT INTO kv_used_jtis (jti, expires_us) VALUES (?, ?) "
            "ON CONFLICT (jti) DO NOTHING RETURNING jti",
            (jti, expires_us),
        )

    def purge_jtis(self, now_us: int) -> int:
        return self._run("DELETE FROM kv_used_jtis WHERE expires_us < ?", (now_us,)).rowcount

    # -- commit heads ----------------------------------------------------------------------
    def get_head(self, instance_id: str) -> CommitHeadRecord | None:
        row = self._run(
            "SELECT instance_id, sequence, hash, genesis_hash, config_hash, signing_public_key, updated_us "
            "FROM kv_commit_heads WHERE instance_id = ?",
            (instance_id,),
        ).fetchone()
        if row is None:
            return None
        return CommitHeadRecord(
            instance_id=row[0],
            sequence=int(row[1]),
            hash=bytes(row[2]),
            genesis_hash=bytes(row[3]),
            config_hash=bytes(row[4]),
            signing_public_key=bytes(row[5]),
            updated_us=int(row[6]),
        )

    def insert_head(self, head: CommitHeadRecord) -> bool:
        return self._inserted(
            "INSERT INTO kv_commit_heads "
            "(instance_id, sequence, hash, genesis_hash, config_hash, signing_public_key, updated_us) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (instance_id) DO NOTHING RETURNING instance_id",
            (
                head.instance_id,
                head.sequence,
                head.hash,
                head.genesis_hash,
                head.config_hash,
                head.signing_public_key,
                head.updated_us,
            ),
        )

    def replace_head(self, head: CommitHeadRecord, *, expected_sequence: int, expected_hash: bytes) -> bool:
        # The genesis never changes: it is part of the compare, not of the set.
        cursor = self._run(
            "UPDATE kv_commit_heads SET sequence = ?, hash = ?, signing_public_key = ?, updated_us = ? "
            "WHERE instance_id = ? AND sequence = ? AND hash = ? AND genesis_hash = ? AND config_hash = ?",
            (
                head.sequence,
                head.hash,
                head.signing_public_key,
                head.updated_us,
                head.instance_id,
                expected_sequence,
                expected_hash,
                head.genesis_hash,
                head.config_hash,
            ),
        )
        return cursor.rowcount == 1

    # -- instance leases --------------------------------------------------------------------
    def get_lease(self, instance_id: str, *, lock: bool = False) -> LeaseRecord | None:
        query = _SELECT_LEASE + " WHERE instance_id = ?" + (self._dialect.lock_suffix if lock else "")
        row = self._run(query, (instance_id,)).fetchone()
        return None if row is None else _lease(row)

    def list_leases(
        self, *, after: str = "", limit: int | None = None, instance_ids: Sequence[str] | None = None
    ) -> list[LeaseRecord]:
        query = _SELECT_LEASE + " WHERE instance_id > ?"
        params: list[Any] = [after]
        if instance_ids is not None:
            if not instance_ids:
                return []
            query += f" AND instance_id IN ({', '.join('?' * len(instance_ids))})"
            params += instance_ids
        query += " ORDER BY instance_id"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        return [_lease(row) for row in self._run(query, params).fetchall()]

    def put_lease(self, lease: LeaseRecord, *, expected_token: int) -> bool:
        values = (lease.holder, lease.token, lease.expires_us, lease.updated_us)
        if expected_token == 0:
            return self._inserted(
                "INSERT INTO kv_leases (holder, token, expires_us, updated_us, instance_id) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance_id) DO NOTHING RETURNING instance_id",
                (*values, lease.instance_id),
            )
        cursor = self._run(
            "UPDATE kv_leases SET holder = ?, token = ?, expires_us = ?, updated_us = ? "
            "WHERE instance_id = ? AND token = ?",
            (*values, lease.instance_id, expected_token),
        )
        return cursor.rowcount == 1

    # -- audit ---------------------------------------------------------------------------
    def audit_tip(self) -> tuple[int, bytes]:
        row = self._run(
            # The suffix is a dialect constant, never input.
            "SELECT sequence, hash FROM kv_audit_tip WHERE id = 1" + self._dialect.lock_suffix  # noqa: S608
        ).fetchone()
        if row is None:
            raise StoreError("audit tip row is missing")
        return int(row[0]), bytes(row[1])

    def insert_audit(self, event: AuditRecord) -> None:
        tip = self._run("SELECT sequence, hash FROM kv_audit_tip WHERE id = 1").fetchone()
        if tip is None or (int(tip[0]) + 1, bytes(tip[1])) != (event.sequence, event.previous_hash):
            raise StoreError("audit append does not extend the current tip")
        # The event first: the tip's trigger lets the tip move only onto an event that exists.
        self._run(
            "INSERT INTO kv_audit_events "
            "(sequence, time_us, action, outcome, caller, detail_json, previous_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.sequence,
                event.time_us,
                event.action,
                event.outcome,
                event.caller,
                event.detail_json,
                event.previous_hash,
                event.hash,
            ),
        )
        if event.tip_signature:
            self.insert_audit_signature(event.sequence, event.tip_signature)
        moved = self._run(
            "UPDATE kv_audit_tip SET sequence = ?, hash = ? WHERE id = 1 AND sequence = ? AND hash = ?",
            (event.sequence, event.hash, event.sequence - 1, event.previous_hash),
        ).rowcount
        if moved != 1:
            raise StoreError("audit append does not extend the current tip")

    def insert_audit_signature(self, sequence: int, signature: bytes) -> bool:
        return self._inserted(
            "INSERT INTO kv_audit_signatures (sequence, signature) VALUES (?, ?) "
            "ON CONFLICT (sequence) DO NOTHING RETURNING sequence",
            (sequence, signature),
        )

    def list_audit(self, *, after_sequence: int, limit: int) -> list[AuditRecord]:
        rows = self._run(
            _SELECT_AUDIT + "WHERE e.sequence > ? ORDER BY e.sequence LIMIT ?",
            (after_sequence, limit),
        ).fetchall()
        return [_audit(row) for row in rows]

    def latest_signed_audit(self) -> AuditRecord | None:
        row = self._run(
            _SELECT_AUDIT + "WHERE s.signature IS NOT NULL ORDER BY e.sequence DESC LIMIT 1"
        ).fetchone()
        return None if row is None else _audit(row)

    # -- idempotency -----------------------------------------------------------------------
    def claim_request(
        self, request_id: str, operation: str, fingerprint: str, now_us: int
    ) -> IdempotencyRecord | None:
        # Insert-first: a concurrent duplicate blocks on the unique key until this commits.
        if self._inserted(
            "INSERT INTO kv_requests (request_id, operation, fingerprint, result_json, created_us) "
            "VALUES (?, ?, ?, NULL, ?) ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            (request_id, operation, fingerprint, now_us),
        ):
            return None  # reserved
        row = self._run(
            "SELECT request_id, operation, fingerprint, result_json, created_us FROM kv_requests "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        if row is None or row[3] is None:
            raise StoreError(f"request {request_id!r} has no recorded result")
        return IdempotencyRecord(
            request_id=row[0],
            operation=row[1],
            fingerprint=row[2],
            result_json=row[3],
            created_us=int(row[4]),
        )

    def complete_request(self, request_id: str, result_json: str) -> None:
        cursor = self._run(
            "UPDATE kv_requests SET result_json = ? WHERE request_id = ? AND result_json IS NULL",
            (result_json, request_id),
        )
        if cursor.rowcount != 1:
            raise StoreError(f"request {request_id!r} was not reserved in this transaction")


_SELECT_LEASE = "SELECT instance_id, holder, token, expires_us, updated_us FROM kv_leases"


def _lease(row: Sequence[Any]) -> LeaseRecord:
    return LeaseRecord(
        instance_id=row[0], holder=row[1], token=int(row[2]), expires_us=int(row[3]), updated_us=int(row[4])
    )


def _audit(row: Sequence[Any]) -> AuditRecord:
    return AuditRecord(
        sequence=int(row[0]),
        time_us=int(row[1]),
        action=row[2],
        outcome=row[3],
        caller=row[4],
        detail_json=row[5],
        previous_hash=bytes(row[6]),
        hash=bytes(row[7]),
        tip_signature=b"" if row[8] is None else bytes(row[8]),
    )


def _key(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        name=row[0],
        policy_json=row[1],
        latest_version=int(row[2]),
        created_us=int(row[3]),
        updated_us=int(row[4]),
        destroyed=bool(row[5]),
    )
