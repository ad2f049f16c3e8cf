"""Outside review: the host's recovery in parts against a hostile or inconsistent database.

Without an enclave (a recording stand-in that answers the head of what it was sent). Each test
documents that the host refuses cleanly (RecoveryRefused, no reader thread left, nothing sent
for a part whose shape is wrong); those that say "Was a break" failed on the code the review read
and pass since the fix.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.state.support import MemoryLog, make_entries
from veil.enclave import wire
from veil.enclave.v1 import ecall_pb2, envelope_pb2, error_pb2
from veil.services.state import recovery
from veil.services.state.enclave_host import EnclaveCallError
from veil.services.state.errors import RecoveryRefused, StoreError
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.store import StoredEntry, StoredHead, StoredSnapshot

INSTANCE = "tokens"
STATEMENT = envelope_pb2.HeadStatement()


class _Enclave:
    """Records each Restore part; answers the head of the last entry sent so far."""

    def __init__(self) -> None:
        self.parts: list[tuple[list[bytes], bool]] = []

    def restore(self, instance_id: str, entries: list[bytes], snapshot: Any, **kwargs: Any) -> Any:
        self.parts = [(list(entries), kwargs["more"])]
        return self._answer(snapshot)

    def continue_restore(self, instance_id: str, entries: list[bytes], *, more: bool) -> Any:
        self.parts.append((list(entries), more))
        return self._answer(None)

    def _answer(self, snapshot: Any) -> ecall_pb2.RestoreResponse:
        sent = [blob for part, _ in self.parts for blob in part]
        if not sent:
            return ecall_pb2.RestoreResponse(head=snapshot.head)
        last = envelope_pb2.LogEntry.FromString(sent[-1])
        return ecall_pb2.RestoreResponse(
            head=envelope_pb2.CommitHead(sequence=last.sequence, hash=wire.entry_hash(last))
        )


@dataclass
class _Hostile(MemoryLog):
    """A MemoryLog whose reads a test can rewrite: `pages` (one list of rows per entries() call,
    then `rows`), a `head_row` that disagrees, a read that fails."""

    pages: list[list[StoredEntry]] = field(default_factory=list)
    head_row: StoredHead | None = None
    fail_on_read: int = 0  # the n-th entries() call raises StoreError (0: none)
    reads: int = 0

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        self.reads += 1
        if self.reads == self.fail_on_read:
            raise StoreError("SQLite error: disk I/O error")
        rows = self.pages.pop(0) if self.pages else self.rows
        top = through if through is not None else 2**63
        return [r for r in rows if r.instance_id == instance_id and after < r.sequence <= top]

    def head(self, instance_id: str) -> StoredHead | None:
        return self.head_row if self.head_row is not None else super().head(instance_id)


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"recovery-{INSTANCE}")]


def _recover(store: _Hostile, remote: RemoteHead | None = None) -> tuple[str, _Enclave]:
    """read_log, check_freshness, restore, as startup.py runs them: "served at N" or the refusal."""
    enclave = _Enclave()
    remote = remote or RemoteHead(0, wire.ZERO_HASH, STATEMENT)
    try:
        log = recovery.read_log(INSTANCE, store.store())
        recovery.check_freshness(log, remote)
        restored = recovery.restore(enclave, log, remote, now_ms=0)  # type: ignore[arg-type]
    except RecoveryRefused as exc:
        said = f"refused: {exc.message}"
    else:
        said = f"served at {restored.head.sequence}"
    assert not _readers(), "a recovery reader thread outlived recovery"
    return said, enclave


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)


def _snapshot_at(rows: list[StoredEntry], sequence: int) -> StoredSnapshot:
    encrypted = envelope_pb2.EncryptedSnapshot(
        instance_id=INSTANCE,
        head=envelope_pb2.CommitHead(sequence=sequence, hash=rows[sequence - 1].entry_hash),
        key_version=1,
        nonce=secrets.token_bytes(12),
        ciphertext=secrets.token_bytes(40),
    )
    return StoredSnapshot(INSTANCE, sequence, encrypted.SerializeToString())


def _relabelled(row: StoredEntry, **fields: Any) -> StoredEntry:
    entry = envelope_pb2.LogEntry.FromString(row.blob)
    for name, value in fields.items():
        setattr(entry, name, value)
    return row._replace(blob=entry.SerializeToString())


# --- inconsistent rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("copy", [2, 4, 8], ids=lambda n: f"entry-{n}-twice")
def test_a_duplicated_sequence_is_refused_before_its_part_is_sent(copy: int) -> None:
    """Held: a row stored twice is a gap for the host, refused before the part it is in is sent."""
    rows = make_entries(INSTANCE, 1, 9)
    duplicated = sorted(
        [*rows, rows[copy - 1]._replace(blob=rows[copy - 1].blob + b"\x00")], key=lambda r: r.sequence
    )
    said, enclave = _recover(_Hostile(duplicated))
    assert said.startswith("refused:")
    assert "log entry is missing" in said
    sent = [blob for part, _ in enclave.parts for blob in part]
    assert sent == [r.blob for r in rows[: (copy - 1) // 3 * 3]]


def test_rows_deleted_between_paged_reads_are_refused() -> None:
    """Held: compaction (or a hostile database) deleting rows between two page reads: a gap."""
    rows = make_entries(INSTANCE, 1, 9)
    store = _Hostile(rows, pages=[rows, rows[:4] + rows[6:]])  # page 1 whole, page 2 without 5, 6
    said, _ = _recover(store)
    assert "at sequence 5: log entry is missing" in said


def test_a_head_row_that_disagrees_with_the_entries_is_refused() -> None:
    """Held: the head row's hash is not the last entry's; the head row is beyond the entries."""
    rows = make_entries(INSTANCE, 1, 7)
    said, _ = _recover(_Hostile(rows, head_row=StoredHead(7, secrets.token_bytes(32))))
    assert said.startswith("refused: instance 'tokens' at sequence 7")
    said, _ = _recover(_Hostile(rows, head_row=StoredHead(9, rows[-1].entry_hash)))
    assert "at sequence 8: log entry is missing" in said


def test_a_head_row_behind_the_entries_serves_only_up_to_it_and_never_past_the_keyvault() -> None:
    """Held: the head row is what recovery serves; entries past it are not sent; a keyvault head
    past it is a rollback, refused."""
    rows = make_entries(INSTANCE, 1, 9)
    said, _ = _recover(_Hostile(rows, head_row=StoredHead(5, rows[4].entry_hash)))
    assert said == "served at 5"
    remote = RemoteHead(9, rows[8].entry_hash, STATEMENT)
    said, _ = _recover(_Hostile(rows, head_row=StoredHead(5, rows[4].entry_hash)), remote)
    assert "(rollback)" in said


def test_a_snapshot_row_beyond_the_entries_is_refused() -> None:
    """Held: a snapshot at 8 with the entries at 5 and a head row below the snapshot."""
    rows = make_entries(INSTANCE, 1, 8)
    snapshot = _snapshot_at(rows, 8)
    store = _Hostile(rows[:5], stored_snapshot=snapshot, head_row=StoredHead(5, rows[4].entry_hash))
    said, enclave = _recover(store)
    assert said.startswith("refused:")
    assert "log entry is missing" in said
    assert enclave.parts == []
    for kv in (5, 7):
        said, enclave = _recover(store, RemoteHead(kv, rows[kv - 1].entry_hash, STATEMENT))
        assert said.startswith("refused:")
        assert enclave.parts == []


def test_a_store_error_on_a_later_page_leaves_no_reader_thread() -> None:
    """Held (a database failure, not a refusal): the StoreError comes out and the thread ends."""
    rows = make_entries(INSTANCE, 1, 9)
    with pytest.raises(StoreError):
        _recover(_Hostile(rows, fail_on_read=2))  # the second page
    assert not _readers()


def test_a_slow_next_page_after_a_refused_part_leaves_no_reader_thread() -> None:
    """Held: the enclave refuses part 1 while page 2 is still being read; recovery waits for the
    read, then refuses; no thread is left behind."""
    rows = make_entries(INSTANCE, 1, 9)
    gate = threading.Event()

    class _Slow(_Hostile):
        def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
            if after == 3:
                gate.wait(5)
            return super().entries(instance_id, after=after, through=through)

    class _Refusing(_Enclave):
        def restore(self, instance_id: str, entries: list[bytes], snapshot: Any, **kwargs: Any) -> Any:
            threading.Timer(0.2, gate.set).start()
            error = error_pb2.EcallError(
                code=error_pb2.ECALL_ERROR_CODE_DATA_LOSS, message="log entry 2: decryption failed"
            )
            raise EnclaveCallError("Restore", error)

    log = recovery.read_log(INSTANCE, _Slow(rows).store())
    with pytest.raises(RecoveryRefused, match="at sequence 2: the enclave refused"):
        recovery.restore(_Refusing(), log, RemoteHead(0, wire.ZERO_HASH, STATEMENT), now_ms=0)  # type: ignore[arg-type]
    assert not _readers()


# --- malformed rows reach the diagnosis and the freshness check ----------------------------------


def _behind_snapshot(damage: Callable[[StoredEntry], StoredEntry]) -> tuple[_Hostile, RemoteHead]:
    """A snapshot at 6 and the keyvault head K = 3 behind it: entries 3..6 are the bridge."""
    rows = make_entries(INSTANCE, 1, 6)
    kv = RemoteHead(3, rows[2].entry_hash, STATEMENT)
    kept = [damage(rows[2]), *rows[3:]]
    return _Hostile(kept, stored_snapshot=_snapshot_at(rows, 6)), kv


@pytest.mark.parametrize(
    "damage",
    [
        lambda row: _relabelled(row, previous_hash=b"short"),
        lambda row: _relabelled(row, nonce=b"\x00" * 70_000),
    ],
    ids=["previous-hash-not-32-bytes", "nonce-too-long-to-encode"],
)
def test_a_malformed_entry_at_the_keyvault_head_behind_a_snapshot_is_a_refusal_not_a_crash(
    damage: Callable[[StoredEntry], StoredEntry],
) -> None:
    """Was a break (older than the parts): `_hash_at` hashed the stored entry at K behind a snapshot
    unguarded (`_chain` guarded it): a stored entry whose previous hash is not 32 bytes, or whose
    nonce is too long for its u16 length, made check_freshness raise ValueError/OverflowError
    instead of RecoveryRefused. Both now hash through one guarded helper."""
    store, kv = _behind_snapshot(damage)
    log = recovery.read_log(INSTANCE, store.store())
    crash: BaseException | None = None
    try:
        with pytest.raises(RecoveryRefused, match="at sequence 3"):
            recovery.check_freshness(log, kv)
    except (ValueError, OverflowError) as exc:
        crash = exc
    assert crash is None, f"check_freshness crashed with {type(crash).__name__}: {crash}"


@settings(max_examples=150, deadline=None)
@given(
    sequence=st.integers(min_value=0, max_value=2**64 - 1),
    key_version=st.integers(min_value=0, max_value=2**32 - 1),
    previous=st.binary(max_size=40),
    nonce=st.one_of(st.binary(max_size=20), st.just(b"\x00" * 65_536)),
    position=st.integers(min_value=1, max_value=6),
)
def test_any_field_values_in_a_stored_entry_give_a_refusal_in_the_diagnosis(
    sequence: int, key_version: int, previous: bytes, nonce: bytes, position: int
) -> None:
    """Held: verify_chain (the diagnosis after a refusal) maps any field values of a stored
    entry after the snapshot to RecoveryRefused, or accepts them only where they are the honest ones."""
    rows = make_entries(INSTANCE, 1, 6)
    rows[position - 1] = _relabelled(
        rows[position - 1], sequence=sequence, key_version=key_version, previous_hash=previous, nonce=nonce
    )
    log = recovery.read_log(INSTANCE, MemoryLog(rows).store())
    with contextlib.suppress(RecoveryRefused):
        recovery.verify_chain(log)
