"""The state service's persistence contract: encrypted log, snapshots, catalogue, idempotency.

Everything stored is either ciphertext produced by the enclave (log entries, snapshots) or
public metadata (instance configuration, sequence numbers, entry hashes, sealed responses the
host cannot read). The store never interprets ciphertext; it keeps the log append-only and
contiguous per instance, and makes each batch durable in one transaction (group commit).

Two backends implement :class:`StateStore`: SQLite (the embedded default, one file under the
data dir) and PostgreSQL (production; replicas shard instances over one database). Both run
the same SQL (`store_sql.py`) and pass one shared test suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoredEntry(NamedTuple):
    """One encrypted log entry: `blob` is a serialized veil.enclave.v1.LogEntry.

    A tuple, not a frozen dataclass: recovery builds one per stored entry, and a frozen
    dataclass took twice as long to build as the database took to read the row."""

    instance_id: str
    sequence: int
    entry_hash: bytes
    blob: bytes

    @classmethod
    def of(cls, entry: envelope_pb2.LogEntry) -> StoredEntry:
        """`entry` as the store keeps it: its place, its chain hash and its bytes."""
        return cls(
            entry.instance_id,
            entry.sequence,
            wire.entry_hash(entry),
            entry.SerializeToString(deterministic=True),
        )


@dataclass(frozen=True)
class StoredSnapshot:
    """The latest snapshot of an instance: `blob` is a serialized EncryptedSnapshot at `sequence`."""

    instance_id: str
    sequence: int
    blob: bytes


@dataclass(frozen=True)
class InstanceRecord:
    """An entry of the instance catalogue: `config` is a serialized InstanceConfig."""

    instance_id: str
    config: bytes
    created_us: int


@dataclass(frozen=True)
class IdempotencyRecord:
    """The first answer to a request id: `response` is a serialized ExecuteResponse."""

    instance_id: str
    request_id: str
    response: bytes
    created_us: int


@dataclass(frozen=True)
class LoadedLog:
    """What recovery replays: the latest snapshot (if any) and every entry after it, in order."""

    snapshot: StoredSnapshot | None
    entries: list[StoredEntry]


@dataclass(frozen=True)
class StoredHead:
    """The last persisted position of an instance's log."""

    sequence: int
    entry_hash: bytes | None  # None when the head entry was compacted behind a snapshot


class StateStore(Protocol):
    """Durable, append-only storage for the state host. Methods are safe to call from any thread.

    Raises `veil.services.state.errors.StoreError` when the database fails and `SequenceConflict`
    when an append does not continue an instance's log exactly.
    """

    backend: str

    def create_instance(self, record: InstanceRecord, genesis: StoredEntry) -> bool:
        """Catalogue an instance and persist its genesis entry atomically; False if it exists."""
        ...

    def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """One catalogue entry, or None."""
        ...

    def list_instances(self) -> list[InstanceRecord]:
        """The whole catalogue, ordered by instance id."""
        ...

    def append_batch(self, entries: Sequence[StoredEntry], responses: Sequence[IdempotencyRecord]) -> None:
        """Append entries (any instances, each contiguous after its head) and record the
        responses, in ONE durable transaction: all of it is committed, or none."""
        ...

    def load(self, instance_id: str) -> LoadedLog:
        """The latest snapshot and the entries after it."""
        ...

    def snapshot(self, instance_id: str) -> StoredSnapshot | None:
        """The latest snapshot, or None."""
        ...

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        """Stored entries with `after` < sequence <= `through` (or to the end), in order."""
        ...

    def head(self, instance_id: str) -> StoredHead | None:
        """The last persisted sequence (entry or snapshot), or None for an unknown instance."""
        ...

    def get_response(self, instance_id: str, request_id: str) -> bytes | None:
        """The recorded response of a request id, or None."""
        ...

    def put_snapshot(self, snapshot: StoredSnapshot) -> bool:
        """Store a snapshot, replacing an older one; False (nothing stored) if one as new exists."""
        ...

    def compact(self, instance_id: str, through: int) -> int:
        """Delete entries with sequence <= `through` (only behind a stored snapshot); returns the count."""
        ...

    def prune_responses(self, created_before_us: int) -> int:
        """Forget idempotency records older than the cutoff; returns the count."""
        ...

    def close(self) -> None:
        """Close every connection."""
        ...


def open_store(url_or_path: str | Path, *, schema: str | None = None) -> StateStore:
    """A PostgreSQL store for a ``postgresql://`` URL, else a SQLite store at the path."""
    target = str(url_or_path)
    if target.startswith(POSTGRES_SCHEMES):
        from veil.services.state.store_postgres import DEFAULT_SCHEMA, PostgresStore

        return PostgresStore(target, schema=schema or DEFAULT_SCHEMA)
    from veil.services.state.store_sqlite import SqliteStore

    return SqliteStore(Path(target))
