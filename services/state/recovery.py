"""Recovery of one instance: verify what the database holds, compare it with the keyvault, replay.

Checks, in order; any failure refuses to serve with an error naming the instance and sequence:

1. **Shape** (host side): the snapshot names its own position; the entries after it are read a
   part at a time (PART_ENTRIES, at most PART_BYTES) as Restore takes them, and each part is
   checked before it is sent: no gap, the first continues the snapshot (or is the genesis
   entry), the last ends at the stored head (its sequence and hash, read first). A gap that a
   newer snapshot explains (an owner that lost the instance compacted behind it between the
   reads) is LogMoved: start-up reads the log again, from that snapshot.
2. **Freshness** against the keyvault's commit head K (the database head is D):
   * D < K: the database is older than the committed log (a rollback): refused;
   * D = K: the hashes must be equal (else a fork): refused otherwise;
   * D > K: accepted only if the entry stored at K has K's hash; the entries after it chain
     and authenticate in step 3 (AES-GCM under the instance key, which only an attested
     enclave holds, with the position and the previous hash in the AAD). That is the window
     of a crash between commit and head advance;
   * K = 0: the keyvault never saw a head (a crash before the genesis head advanced): accepted.
3. **Replay** in the enclave (Restore, in parts: the host reads the next part from the database
   while the enclave replays this one, and no frame grows with the log): it decrypts and
   authenticates the snapshot and every entry and re-executes them; a DATA_LOSS there is
   refused too. The enclave checks step 2 itself: Restore carries the keyvault's statement of
   head K and the registered genesis, made for this enclave's signing key and a challenge it
   issued just before (GetCommitHead), and the enclave refuses (FAILED_PRECONDITION "rollback
   refused") a log that does not contain K or starts from another genesis. A snapshot beyond
   K is sent with the stored entries K..snapshot, which the enclave only hash-chains (all in
   the first part). Step 2 here is the host's early, better-worded check.
4. **Diagnosis**, only when a check above refuses: the host reads the whole log again and checks
   the chain entry by entry (every entry parses, sits at its own position, hashes to its stored
   hash, continues the previous hash) and names the first bad entry, quoting the enclave's
   reason when it has one. The enclave checks all of that anyway, so the host hands it the
   entries as stored, unparsed, and a good log is checked once, not twice. (So a stored hash
   that disagrees with an intact entry is found only where that hash is used: at the head, at
   K, behind a snapshot.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from veil.enclave import wire
from veil.enclave.v1 import ecall_pb2, envelope_pb2, error_pb2
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost
from veil.services.state.errors import RecoveryRefused
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.store import StateStore, StoredEntry

_log = logging.getLogger(__name__)
_ENTRY_IN_MESSAGE = re.compile(r"log entry (\d+)")
# A Restore part: the entries read from the database in one query, fewer when they are large.
PART_ENTRIES = 4096
PART_BYTES = 16 * 1024 * 1024


class MissingKey(Exception):
    """The enclave lacks a key version the stored data was encrypted under."""

    def __init__(self, message: str, versions: set[int]) -> None:
        super().__init__(message)
        self.versions = versions  # every key version the snapshot and entries name


@dataclass(frozen=True)
class StoredLog:
    """An instance's stored log as recovery reads it: the snapshot and where the entries after it
    end (read first); the entries themselves are read from `store` as Restore takes them."""

    instance_id: str
    store: StateStore
    snapshot: envelope_pb2.EncryptedSnapshot | None
    head_sequence: int
    head_hash: bytes

    @property
    def snapshot_sequence(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.head.sequence

    @property
    def snapshot_hash(self) -> bytes:
        return wire.ZERO_HASH if self.snapshot is None else self.snapshot.head.hash

    @property
    def entry_count(self) -> int:
        """The entries after the snapshot: what a restore replays."""
        return self.head_sequence - self.snapshot_sequence

    def entries(self) -> list[StoredEntry]:
        """Every stored entry after the snapshot, up to the head (for the diagnosis)."""
        return self.store.entries(self.instance_id, after=self.snapshot_sequence, through=self.head_sequence)


class LogMoved(RecoveryRefused):
    """The stored log changed under recovery's reads (a snapshot taken, the entries behind it
    compacted, by an owner that lost the instance): read it again."""


_GAP = "log entry is missing (the chain has a gap)"


def _gap(instance_id: str, sequence: int) -> RecoveryRefused:
    return RecoveryRefused(instance_id, sequence, _GAP)


def _parse_entry(instance_id: str, stored: StoredEntry) -> envelope_pb2.LogEntry:
    try:
        entry = envelope_pb2.LogEntry.FromString(stored.blob)
    except DecodeError:
        raise RecoveryRefused(instance_id, stored.sequence, "log entry is unreadable (corrupted)") from None
    if entry.instance_id != instance_id or entry.sequence != stored.sequence:
        raise RecoveryRefused(
            instance_id, stored.sequence, "log entry is stored at a position it does not name"
        )
    return entry


def _entry_hash(instance_id: str, sequence: int, entry: envelope_pb2.LogEntry) -> bytes:
    try:
        return wire.entry_hash(entry)
    except (ValueError, OverflowError):  # a previous hash, nonce or ciphertext the encoding refuses
        raise RecoveryRefused(instance_id, sequence, "log entry is malformed") from None


def _chain(
    instance_id: str, stored_entries: list[StoredEntry], sequence: int, head_hash: bytes
) -> tuple[list[envelope_pb2.LogEntry], int, bytes]:
    """Check that `stored_entries` continue (sequence, head_hash); returns them parsed and the end."""
    entries = []
    for stored in stored_entries:
        if stored.sequence != sequence + 1:
            raise _gap(instance_id, sequence + 1)
        entry = _parse_entry(instance_id, stored)
        if len(entry.previous_hash) != wire.HASH_SIZE or entry.previous_hash != head_hash:
            raise RecoveryRefused(
                instance_id,
                stored.sequence,
                f"log entry does not chain to entry {sequence} (broken chain: an entry was replaced)",
            )
        digest = _entry_hash(instance_id, stored.sequence, entry)
        if digest != stored.entry_hash:
            raise RecoveryRefused(
                instance_id,
                stored.sequence,
                "log entry was altered (its hash does not match the stored hash)",
            )
        entries.append(entry)
        sequence, head_hash = stored.sequence, digest
    return entries, sequence, head_hash


def read_log(instance_id: str, store: StateStore) -> StoredLog:
    """Step 1, its start: the stored snapshot names its own position; where the entries end."""
    snapshot = None
    stored_snapshot = store.snapshot(instance_id)
    if stored_snapshot is not None:
        try:
            snapshot = envelope_pb2.EncryptedSnapshot.FromString(stored_snapshot.blob)
        except DecodeError:
            raise RecoveryRefused(instance_id, stored_snapshot.sequence, "snapshot is unreadable") from None
        if (
            snapshot.instance_id != instance_id
            or snapshot.head.sequence != stored_snapshot.sequence
            or len(snapshot.head.hash) != wire.HASH_SIZE
        ):
            why = "snapshot does not match its position"
            raise RecoveryRefused(instance_id, stored_snapshot.sequence, why)
    head = store.head(instance_id)
    if head is None or head.sequence == 0:
        raise RecoveryRefused(
            instance_id, 1, "the catalogue lists the instance but its genesis entry is missing"
        )
    if snapshot is not None and head.sequence == snapshot.head.sequence:
        return StoredLog(instance_id, store, snapshot, head.sequence, snapshot.head.hash)
    if head.entry_hash is None:
        raise _gap(instance_id, head.sequence)
    return StoredLog(instance_id, store, snapshot, head.sequence, head.entry_hash)


def _parts(log: StoredLog) -> Generator[tuple[list[StoredEntry], bool]]:
    """Step 1, the rest: the entries after the snapshot in Restore parts, each checked for shape
    before it is given out, with whether it is the last; the next is read meanwhile."""
    sequence, last = log.snapshot_sequence, log.head_sequence

    def read(after: int) -> list[StoredEntry]:
        return log.store.entries(log.instance_id, after=after, through=min(after + PART_ENTRIES, last))

    with ThreadPoolExecutor(1, thread_name_prefix=f"recovery-{log.instance_id}") as reader:
        page = reader.submit(read, sequence)
        while True:
            entries = page.result()
            end = min(sequence + PART_ENTRIES, last)
            if end < last:
                page = reader.submit(read, end)  # read while this part replays
            for stored in entries:
                if stored.sequence != sequence + 1:
                    raise _missing(log, sequence + 1)
                sequence = stored.sequence
            if sequence != end:
                raise _missing(log, sequence + 1)
            if sequence == last and entries and entries[-1].entry_hash != log.head_hash:
                raise _refuse(log, sequence, "the stored head moved while recovery read it")
            yield from _by_size(entries, final=end == last)
            if end == last:
                return


def _moved_or(log: StoredLog, broken: RecoveryRefused) -> RecoveryRefused:
    """What the diagnosis found, unless it is a gap that a newer snapshot explains (LogMoved)."""
    return _missing(log, broken.sequence) if broken.why == _GAP else broken


def _missing(log: StoredLog, sequence: int) -> RecoveryRefused:
    """A gap in the entries read: the log moved if a newer snapshot was stored meanwhile."""
    stored = log.store.snapshot(log.instance_id)
    if stored is not None and stored.sequence > log.snapshot_sequence:
        why = f"the log moved while recovery read it (a snapshot at {stored.sequence} was stored)"
        return LogMoved(log.instance_id, sequence, why)
    return _gap(log.instance_id, sequence)


def _by_size(entries: list[StoredEntry], *, final: bool) -> Iterator[tuple[list[StoredEntry], bool]]:
    """`entries` as parts of at most PART_BYTES (or of one larger entry); `final`: the last ones."""
    part: list[StoredEntry] = []
    size = 0
    for stored in entries:
        if part and size + len(stored.blob) > PART_BYTES:
            yield part, False
            part, size = [], 0
        part.append(stored)
        size += len(stored.blob)
    yield part, final


def verify_chain(log: StoredLog) -> set[int]:
    """Step 4: every entry parses and chains up to the head; returns the key versions the log names."""
    entries, end, _ = _chain(log.instance_id, log.entries(), log.snapshot_sequence, log.snapshot_hash)
    if end != log.head_sequence:
        raise _gap(log.instance_id, end + 1)
    versions = {entry.key_version for entry in entries}
    return versions if log.snapshot is None else versions | {log.snapshot.key_version}


def _refuse(log: StoredLog, sequence: int, why: str) -> RecoveryRefused:
    """The refusal to raise: the first bad entry if the stored chain is broken, else `why`."""
    try:
        verify_chain(log)
    except RecoveryRefused as broken:
        return _moved_or(log, broken)
    return RecoveryRefused(log.instance_id, sequence, why)


def _hash_at(log: StoredLog, sequence: int) -> bytes:
    """The chain's hash at `sequence` (<= the head), reading compacted-behind entries if needed.
    After the snapshot it is the stored hash: the enclave checks it against the entry (step 3)."""
    if sequence == log.head_sequence:
        return log.head_hash
    if sequence == log.snapshot_sequence:
        return log.snapshot_hash
    if sequence > log.snapshot_sequence:
        stored = log.store.entries(log.instance_id, after=sequence - 1, through=sequence)
        if not stored:
            raise _gap(log.instance_id, sequence)
        return stored[0].entry_hash
    # Before the snapshot: the entries from `sequence` up to the snapshot must still be stored
    # (compaction keeps them until the keyvault head passes the snapshot) and chain into it.
    behind = log.store.entries(log.instance_id, after=sequence - 1, through=log.snapshot_sequence)
    if not behind or behind[0].sequence != sequence:
        raise RecoveryRefused(
            log.instance_id, sequence, "the entry at the keyvault's commit head is missing from the database"
        )
    first_hash = _entry_hash(log.instance_id, sequence, _parse_entry(log.instance_id, behind[0]))
    if first_hash != behind[0].entry_hash:
        raise RecoveryRefused(log.instance_id, sequence, "log entry was altered (its hash does not match)")
    _, end, end_hash = _chain(log.instance_id, behind[1:], sequence, first_hash)
    if log.snapshot is None or (end, end_hash) != (log.snapshot_sequence, log.snapshot.head.hash):
        raise RecoveryRefused(log.instance_id, end, "the stored entries do not chain into the snapshot")
    return first_hash


def check_freshness(log: StoredLog, remote: RemoteHead) -> None:
    """Step 2: the database is not older than, and does not fork from, the keyvault's head."""
    if remote.sequence == 0:
        return
    if log.head_sequence < remote.sequence:
        raise RecoveryRefused(
            log.instance_id,
            remote.sequence,
            f"the database ends at sequence {log.head_sequence} but the keyvault's commit head is "
            f"{remote.sequence}: the database is older than the committed log (rollback)",
        )
    if _hash_at(log, remote.sequence) != remote.hash:
        raise _refuse(
            log,
            remote.sequence,
            "the stored entry differs from the keyvault's commit head (a fork or a tampered log)",
        )


def _bridge(log: StoredLog, sequence: int) -> list[StoredEntry]:
    """The stored entries from `sequence` through a snapshot beyond it (checked by _hash_at)."""
    if log.snapshot is None or not 0 < sequence < log.snapshot_sequence:
        return []
    return log.store.entries(log.instance_id, after=sequence - 1, through=log.snapshot_sequence)


def restore(
    enclave: EnclaveHost,
    log: StoredLog,
    remote: RemoteHead,
    *,
    now_ms: int,
    progress: Callable[[int], None] = lambda replayed: None,
) -> ecall_pb2.RestoreResponse:
    """Step 3: replay in the enclave, in parts; MissingKey when a key version must be released first.

    `remote` carries the keyvault's statement for this enclave and its current challenge (after
    check_freshness passed); the challenge is used up whatever the outcome. `progress` hears
    how many of the log's entries are replayed after each part.
    """
    if remote.statement is None:
        raise ValueError("restore needs the keyvault's head statement for this enclave")
    bridge = [stored.blob for stored in _bridge(log, remote.sequence)]
    restored, replayed = None, 0
    try:
        with closing(_parts(log)) as parts:  # its reader thread ends with it
            for part, last in parts:
                blobs = [stored.blob for stored in part]
                if restored is None:
                    restored = enclave.restore(
                        log.instance_id,
                        bridge + blobs,
                        log.snapshot,
                        statement=remote.statement,
                        host_time_unix_ms=now_ms,
                        more=not last,
                    )
                else:
                    restored = enclave.continue_restore(log.instance_id, blobs, more=not last)
                replayed += len(part)
                progress(replayed)
    except EnclaveCallError as exc:  # the enclave ended the restore itself
        raise _refusal(log, exc) from None
    except Exception:  # a part may have gone in with `more` (its answer lost, even): the rest will not
        _abandon(enclave, log.instance_id)
        raise
    assert restored is not None  # _parts gives at least one part
    head = restored.head
    if (head.sequence, head.hash) != (log.head_sequence, log.head_hash):
        # The enclave now holds the instance; the host refuses to serve it (and says why).
        raise _refuse(log, head.sequence, "the enclave restored a different head than the stored chain")
    return restored


def _abandon(enclave: EnclaveHost, instance_id: str) -> None:
    """Drop the enclave's open restore, so the memory it holds is free for what the host serves."""
    try:
        enclave.abandon_restore(instance_id)
    except Exception as exc:  # the error being raised says more; a dead runner is found anyway
        _log.warning("instance %r: abandoning its open restore failed: %s", instance_id, exc)


def _refusal(log: StoredLog, exc: EnclaveCallError) -> Exception:
    """What a Restore refusal means: the first bad entry, a key to release, or the enclave's words."""
    said = f"{exc.code_name}: {exc.message}"
    try:
        versions = verify_chain(log)  # names the first bad entry, if any (no key worth releasing)
    except RecoveryRefused as found:
        broken = _moved_or(log, found)
        if isinstance(broken, LogMoved):
            return broken
        return RecoveryRefused(log.instance_id, broken.sequence, f"{broken.why}; the enclave: {said}")
    if exc.code == error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION and "not provisioned" in exc.message:
        return MissingKey(exc.message, versions)
    if exc.code == error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED:
        why = "the enclave memory budget is too small to restore it"
        return RecoveryRefused(log.instance_id, log.head_sequence, why)
    match = _ENTRY_IN_MESSAGE.search(exc.message)
    sequence = int(match.group(1)) if match else log.snapshot_sequence
    return RecoveryRefused(log.instance_id, sequence, f"the enclave refused the stored data ({said})")
