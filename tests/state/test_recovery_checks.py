"""The host's recovery checks without an enclave: shape before Restore, diagnosis after a refusal.

Restore gets the entries as stored; the host parses and chains them only when the enclave
refuses, to name the first bad entry (the enclave checks all of it anyway).
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.state.support import MemoryLog, make_entries
from veil.enclave import wire
from veil.enclave.v1 import ecall_pb2, envelope_pb2, error_pb2
from veil.services.state import recovery
from veil.services.state.enclave_host import EnclaveCallError
from veil.services.state.errors import RecoveryRefused
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.store import StoredEntry, StoredSnapshot

INSTANCE = "tokens"


def _log(versions: list[int]) -> list[StoredEntry]:
    return make_entries(INSTANCE, 1, len(versions), key_versions=versions)


class _Enclave:
    """Records what Restore was sent; answers with `head` or refuses with `refusal`."""

    def __init__(self, refusal: tuple[error_pb2.EcallErrorCode.ValueType, str] | None = None) -> None:
        self.refusal = refusal
        self.sent: list[Any] = []
        self.parts: list[tuple[int, bool]] = []  # (entries, more) of each Restore call
        self.head_hash: bytes | None = None  # else the hash of the last entry sent

    def restore(
        self, instance_id: str, entries: list[Any], snapshot: Any, *, more: bool, **_: Any
    ) -> ecall_pb2.RestoreResponse:
        self.sent, self.parts = list(entries), [(len(entries), more)]
        return self._answer(self.sent)

    def continue_restore(
        self, instance_id: str, entries: list[Any], *, more: bool
    ) -> ecall_pb2.RestoreResponse:
        self.sent += entries
        self.parts.append((len(entries), more))
        return self._answer(self.sent)

    def _answer(self, entries: list[Any]) -> ecall_pb2.RestoreResponse:
        if self.refusal is not None:
            code, message = self.refusal
            raise EnclaveCallError("Restore", error_pb2.EcallError(code=code, message=message))
        last = envelope_pb2.LogEntry.FromString(entries[-1])
        head = envelope_pb2.CommitHead(sequence=last.sequence, hash=self.head_hash or wire.entry_hash(last))
        return ecall_pb2.RestoreResponse(head=head)


def _restore(enclave: _Enclave, stored: list[StoredEntry]) -> ecall_pb2.RestoreResponse:
    log = recovery.read_log(INSTANCE, MemoryLog(stored).store())
    remote = RemoteHead(0, wire.ZERO_HASH, envelope_pb2.HeadStatement())
    return recovery.restore(enclave, log, remote, now_ms=0)  # type: ignore[arg-type]


def test_restore_gets_the_stored_bytes_unparsed() -> None:
    stored = _log([1, 1, 1])
    enclave = _Enclave()
    assert _restore(enclave, stored).head.sequence == 3
    assert enclave.sent == [entry.blob for entry in stored]


def test_a_gap_is_refused_before_the_enclave_sees_the_part_it_is_in(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = _log([1] * 7)
    enclave = _Enclave()
    with pytest.raises(RecoveryRefused, match="at sequence 2: log entry is missing"):
        _restore(enclave, [stored[0], *stored[2:]])
    assert enclave.sent == []
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    for gone in (4, 5):  # both in the second part
        with pytest.raises(RecoveryRefused, match=f"at sequence {gone + 1}: log entry is missing"):
            _restore(enclave, stored[:gone] + stored[gone + 1 :])
        assert enclave.sent == [e.blob for e in stored[:3]]


def test_a_log_compacted_behind_a_new_snapshot_while_it_is_read_is_to_be_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An owner that lost the instance (and does not know yet) snapshots and compacts between two
    of recovery's reads: LogMoved (start-up reads the log again from the newer snapshot), not a gap."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    memory = MemoryLog(_log([1] * 7))
    read = memory.entries

    def entries(instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        if after == 3:  # the second part's read
            memory.stored_snapshot = StoredSnapshot(INSTANCE, 5, b"a snapshot at 5")
            memory.rows = [row for row in memory.rows if row.sequence > 5]
        return read(instance_id, after=after, through=through)

    memory.entries = entries  # type: ignore[method-assign]
    log = recovery.read_log(INSTANCE, memory.store())
    remote = RemoteHead(0, wire.ZERO_HASH, envelope_pb2.HeadStatement())
    with pytest.raises(recovery.LogMoved, match=r"at sequence 4: the log moved .*snapshot at 5"):
        recovery.restore(_Enclave(), log, remote, now_ms=0)  # type: ignore[arg-type]


def test_progress_is_told_after_every_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    told: list[int] = []
    log = recovery.read_log(INSTANCE, MemoryLog(_log([1] * 7)).store())
    remote = RemoteHead(0, wire.ZERO_HASH, envelope_pb2.HeadStatement())
    recovery.restore(_Enclave(), log, remote, now_ms=0, progress=told.append)  # type: ignore[arg-type]
    assert told == [3, 6, 7]


@pytest.mark.parametrize(
    ("entries", "part_bytes", "parts"),
    [
        (3, 2**20, [(3, False)]),  # one part, the last
        (7, 2**20, [(3, True), (3, True), (1, False)]),
        (6, 2**20, [(3, True), (3, False)]),
        (3, 1, [(1, True), (1, True), (1, False)]),  # each entry over the byte bound: one a part
    ],
)
def test_parts_are_bounded_in_entries_and_bytes(
    monkeypatch: pytest.MonkeyPatch, entries: int, part_bytes: int, parts: list[tuple[int, bool]]
) -> None:
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    monkeypatch.setattr(recovery, "PART_BYTES", part_bytes)
    stored = _log([1] * entries)
    enclave = _Enclave()
    assert _restore(enclave, stored).head.sequence == entries
    assert enclave.sent == [e.blob for e in stored]
    assert enclave.parts == [(n, more) for n, more in parts]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda e: e._replace(blob=b"\xff" + e.blob), "at sequence 2: log entry is unreadable"),
        (lambda e: e._replace(entry_hash=secrets.token_bytes(32)), "at sequence 2: log entry was altered"),
        (lambda e: e._replace(sequence=3), "at sequence 2: log entry is missing"),
    ],
)
def test_after_a_refusal_the_host_names_the_first_bad_entry(damage: Any, says: str) -> None:
    stored = _log([1, 1, 1])
    stored[1] = damage(stored[1])
    enclave = _Enclave((error_pb2.ECALL_ERROR_CODE_DATA_LOSS, "log entry 2: decryption failed"))
    with pytest.raises(RecoveryRefused, match=says):
        _restore(enclave, stored)


def test_a_refusal_on_a_sound_chain_says_what_the_enclave_said() -> None:
    enclave = _Enclave((error_pb2.ECALL_ERROR_CODE_DATA_LOSS, "log entry 3: decryption failed"))
    with pytest.raises(RecoveryRefused, match=r"at sequence 3: the enclave refused .*DATA_LOSS"):
        _restore(enclave, _log([1, 1, 1]))


def test_a_missing_key_names_every_version_the_log_uses() -> None:
    message = "key version 1 of 'tokens' not provisioned"
    enclave = _Enclave((error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION, message))
    with pytest.raises(recovery.MissingKey) as missing:
        _restore(enclave, _log([1, 1, 2, 3]))
    assert missing.value.versions == {1, 2, 3}


def test_a_head_that_disagrees_with_the_stored_one_is_refused() -> None:
    stored = _log([1, 1])
    lying = [stored[0], stored[1]._replace(entry_hash=secrets.token_bytes(32))]  # the column lies
    with pytest.raises(RecoveryRefused, match="at sequence 2: log entry was altered"):
        _restore(_Enclave(), lying)
    enclave = _Enclave()
    enclave.head_hash = secrets.token_bytes(32)  # the chain is sound; the enclave's head is not
    with pytest.raises(RecoveryRefused, match="at sequence 2: the enclave restored a different head"):
        _restore(enclave, stored)
