"""The SQL both state stores run: one implementation of `StateStore` over a DB-API connection.

SQLite and PostgreSQL accept the same statements here; they differ in the parameter marker,
the column types of the schema (the dialect, :mod:`veil.services.common.sql`), and how a
transaction is opened (see the two backends). Statements are written with ``?`` markers and
translated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from veil.services.common.sql import Cursor, Dialect
from veil.services.state.errors import SequenceConflict
from veil.services.state.store import (
    IdempotencyRecord,
    InstanceRecord,
    LoadedLog,
    StoredEntry,
    StoredHead,
    StoredSnapshot,
)


def schema_statements(dialect: Dialect) -> list[str]:
    """The tables, with the engine's binary and 64-bit integer column types."""
    blob, integer = dialect.blob, dialect.integer
    return [
        f"""CREATE TABLE IF NOT EXISTS st_instances (
            instance_id TEXT PRIMARY KEY,
            config {blob} NOT NULL,
            created_us {integer} NOT NULL
        )""",
        # The log: append-only per instance, keyed by its position. Rows are deleted only by
        # compaction, behind a stored snapshot.
        f"""CREATE TABLE IF NOT EXISTS st_entries (
            instance_id TEXT NOT NULL REFERENCES st_instances (instance_id),
            sequence {integer} NOT NULL,
            entry_hash {blob} NOT NULL,
            entry {blob} NOT NULL,
            PRIMARY KEY (instance_id, sequence)
        )""",
        # Only the latest snapshot per instance is kept.
        f"""CREATE TABLE IF NOT EXISTS st_snapshots (
            instance_id TEXT PRIMARY KEY REFERENCES st_instances (instance_id),
            sequence {integer} NOT NULL,
            snapshot {blob} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS st_responses (
            instance_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            response {blob} NOT NULL,
            created_us {integer} NOT NULL,
            PRIMARY KEY (instance_id, request_id)
        )""",
        "CREATE INDEX IF NOT EXISTS st_responses_created ON st_responses (created_us)",
    ]


class Tx:
    """Statements inside one open transaction."""

    def __init__(self, cursor: Cursor, dialect: Dialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def run(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._cursor.execute(self._dialect.sql(sql), tuple(params))
        return self._cursor

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(self._dialect.sql(sql), rows)

    def head_sequence(self, instance_id: str) -> int | None:
        """max(last entry, snapshot) for a catalogued instance, else None."""
        row = self.run(
            "SELECT (SELECT 1 FROM st_instances WHERE instance_id = ?), "
            "(SELECT max(sequence) FROM st_entries WHERE instance_id = ?), "
            "(SELECT sequence FROM st_snapshots WHERE instance_id = ?)",
            (instance_id, instance_id, instance_id),
        ).fetchone()
        if row[0] is None:
            return None
        return max(int(row[1] or 0), int(row[2] or 0))


_INSERT_ENTRY = "INSERT INTO st_entries (instance_id, sequence, entry_hash, entry) VALUES (?, ?, ?, ?)"
_ENTRY_COLUMNS = "SELECT instance_id, sequence, entry_hash, entry FROM st_entries"


def _entry(row: Sequence[Any]) -> StoredEntry:
    return StoredEntry(row[0], int(row[1]), bytes(row[2]), bytes(row[3]))


def _entry_row(entry: StoredEntry) -> tuple[Any, ...]:
    return (entry.instance_id, entry.sequence, entry.entry_hash, entry.blob)


def _snapshot(tx: Tx, instance_id: str) -> StoredSnapshot | None:
    row = tx.run(
        "SELECT instance_id, sequence, snapshot FROM st_snapshots WHERE instance_id = ?", (instance_id,)
    ).fetchone()
    return None if row is None else StoredSnapshot(row[0], int(row[1]), bytes(row[2]))


def _group_contiguous(entries: Sequence[StoredEntry]) -> dict[str, list[StoredEntry]]:
    groups: dict[str, list[StoredEntry]] = {}
    for entry in entries:
        group = groups.setdefault(entry.instance_id, [])
        if group and entry.sequence != group[-1].sequence + 1:
            raise SequenceConflict(
                f"instance {entry.instance_id!r}: entry {entry.sequence} does not follow {group[-1].sequence}"
            )
        group.append(entry)
    return groups


class SqlStateStore(ABC):
    """`StateStore` in SQL; a backend supplies connections and transactions."""

    backend: str
    dialect: Dialect

    @abstractmethod
    def _write(self) -> AbstractContextManager[Tx]:
        """A write transaction that serialises against other writers; commits durably on exit."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Tx]:
        """A read-only transaction over one consistent snapshot of the database."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection."""

    # -- catalogue -------------------------------------------------------------------------
    def create_instance(self, record: InstanceRecord, genesis: StoredEntry) -> bool:
        if genesis.instance_id != record.instance_id or genesis.sequence != 1:
            raise SequenceConflict(f"instance {record.instance_id!r}: the genesis entry must be sequence 1")
        with self._write() as tx:
            row = tx.run(
                "INSERT INTO st_instances (instance_id, config, created_us) VALUES (?, ?, ?) "
                "ON CONFLICT (instance_id) DO NOTHING RETURNING instance_id",
                (record.instance_id, record.config, record.created_us),
            ).fetchone()
            if row is None:
                return False
            tx.run(_INSERT_ENTRY, _entry_row(genesis))
        return True

    def get_instance(self, instance_id: str) -> InstanceRecord | None:
        with self._read() as tx:
            row = tx.run(
                "SELECT instance_id, config, created_us FROM st_instances WHERE instance_id = ?",
                (instance_id,),
            ).fetchone()
        return None if row is None else InstanceRecord(row[0], bytes(row[1]), int(row[2]))

    def list_instances(self) -> list[InstanceRecord]:
        with self._read() as tx:
            rows = tx.run(
                "SELECT instance_id, config, created_us FROM st_instances ORDER BY instance_id"
            ).fetchall()
        return [InstanceRecord(row[0], bytes(row[1]), int(row[2])) for row in rows]

    # -- the log ---------------------------------------------------------------------------
    def append_batch(self, entries: Sequence[StoredEntry], responses: Sequence[IdempotencyRecord]) -> None:
        groups = _group_contiguous(entries)
        with self._write() as tx:
            for instance_id, group in groups.items():
                head = tx.head_sequence(instance_id)
                if head is None:
                    raise SequenceConflict(f"instance {instance_id!r} is not in the catalogue")
                if group[0].sequence != head + 1:
                    raise SequenceConflict(
                        f"instance {instance_id!r}: entry {group[0].sequence} does not follow head {head}"
                    )
            tx.many(_INSERT_ENTRY, [_entry_row(entry) for entry in entries])
            # A request id already answered keeps its first answer.
            tx.many(
                "INSERT INTO st_responses (instance_id, request_id, response, created_us) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (instance_id, request_id) DO NOTHING",
                [(r.instance_id, r.request_id, r.response, r.created_us) for r in responses],
            )

    def load(self, instance_id: str) -> LoadedLog:
        with self._read() as tx:
            snapshot = _snapshot(tx, instance_id)
            rows = tx.run(
                f"{_ENTRY_COLUMNS} WHERE instance_id = ? AND sequence > ? ORDER BY sequence",
                (instance_id, 0 if snapshot is None else snapshot.sequence),
            ).fetchall()
        return LoadedLog(snapshot=snapshot, entries=[_entry(r) for r in rows])

    def snapshot(self, instance_id: str) -> StoredSnapshot | None:
        with self._read() as tx:
            return _snapshot(tx, instance_id)

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        upper = 2**63 - 1 if through is None else through
        with self._read() as tx:
            rows = tx.run(
                f"{_ENTRY_COLUMNS} WHERE instance_id = ? AND sequence > ? AND sequence <= ? "
                "ORDER BY sequence",
                (instance_id, after, upper),
            ).fetchall()
        return [_entry(r) for r in rows]

    def head(self, instance_id: str) -> StoredHead | None:
        with self._read() as tx:
            sequence = tx.head_sequence(instance_id)
            if sequence is None:
                return None
            row = tx.run(
                "SELECT entry_hash FROM st_entries WHERE instance_id = ? AND sequence = ?",
                (instance_id, sequence),
            ).fetchone()
        return StoredHead(sequence=sequence, entry_hash=None if row is None else bytes(row[0]))

    def get_response(self, instance_id: str, request_id: str) -> bytes | None:
        with self._read() as tx:
            row = tx.run(
                "SELECT response FROM st_responses WHERE instance_id = ? AND request_id = ?",
                (instance_id, request_id),
            ).fetchone()
        return None if row is None else bytes(row[0])

    # -- snapshots and compaction ------------------------------------------------------------
    def put_snapshot(self, snapshot: StoredSnapshot) -> bool:
        with self._write() as tx:
            head = tx.head_sequence(snapshot.instance_id)
            if head is None:
                raise SequenceConflict(f"instance {snapshot.instance_id!r} is not in the catalogue")
            if snapshot.sequence > head:
                raise SequenceConflict(
                    f"instance {snapshot.instance_id!r}: snapshot at {snapshot.sequence} is past head {head}"
                )
            row = tx.run(
                "INSERT INTO st_snapshots (instance_id, sequence, snapshot) VALUES (?, ?, ?) "
                "ON CONFLICT (instance_id) DO UPDATE SET sequence = excluded.sequence, "
                "snapshot = excluded.snapshot WHERE st_snapshots.sequence < excluded.sequence "
                "RETURNING sequence",
                (snapshot.instance_id, snapshot.sequence, snapshot.blob),
            ).fetchone()
        return row is not None

    def compact(self, instance_id: str, through: int) -> int:
        with self._write() as tx:
            row = tx.run("SELECT sequence FROM st_snapshots WHERE instance_id = ?", (instance_id,)).fetchone()
            # Never delete an entry no snapshot covers: it would be lost for good.
            if row is None or through > int(row[0]):
                raise SequenceConflict(
                    f"instance {instance_id!r}: cannot compact through {through} without a snapshot there"
                )
            return tx.run(
                "DELETE FROM st_entries WHERE instance_id = ? AND sequence <= ?", (instance_id, through)
            ).rowcount

    def prune_responses(self, created_before_us: int) -> int:
        with self._write() as tx:
            return tx.run("DELETE FROM st_responses WHERE created_us < ?", (created_before_us,)).rowcount
