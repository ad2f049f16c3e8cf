"""Periodic snapshots and log compaction behind them.

Every `snapshot_every` entries the host asks the enclave for an encrypted snapshot of the
instance at its head S, stores it, then deletes the log entries it covers. Compaction keeps
the entries the keyvault's commit head K still needs for the freshness check at recovery:
if K >= S everything up to S goes; if K < S, entries from K on stay (recovery.py verifies
that K is on the chain into the snapshot), and a later snapshot compacts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.store import StateStore, StoredSnapshot


@dataclass(frozen=True)
class SnapshotResult:
    """What one snapshot did."""

    sequence: int
    compacted: int


def compaction_bound(snapshot_sequence: int, confirmed: int) -> int:
    """The highest sequence that may be deleted behind a snapshot at `snapshot_sequence`."""
    return snapshot_sequence if confirmed >= snapshot_sequence else confirmed - 1


def take_snapshot(
    enclave: EnclaveHost, store: StateStore, instance_id: str, *, confirmed: int
) -> SnapshotResult:
    """Snapshot the instance at its current (committed) head, store it, compact behind it."""
    snapshot = enclave.snapshot(instance_id)
    sequence = snapshot.head.sequence
    store.put_snapshot(StoredSnapshot(instance_id, sequence, snapshot.SerializeToString(deterministic=True)))
    through = compaction_bound(sequence, confirmed)
    compacted = store.compact(instance_id, through) if through > 0 else 0
    return SnapshotResult(sequence, compacted)
