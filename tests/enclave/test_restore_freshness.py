"""Restore checks freshness itself: the keyvault's head, signed for this enclave, must be in the log.

A malicious host could otherwise start a fresh enclave, have the instance key released and
restore an old prefix of the log (docs/security.md row 49). Every refusal here is
FAILED_PRECONDITION "rollback refused" and leaves the enclave exactly as it was.
"""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2

from enclave import wire
from services.state.enclave_host import EnclaveCallError
from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import Harness, config, head_statement, vault


def _head(entry: envelope_pb2.LogEntry) -> envelope_pb2.CommitHead:
    return envelope_pb2.CommitHead(sequence=entry.sequence, hash=wire.entry_hash(entry))


@pytest.fixture
def worlds(make_enclave: MakeEnclave) -> tuple[Harness, Harness]:
    """An enclave with a 5-entry log of "v", and a fresh enclave holding the same data key."""
    platform = secrets.token_bytes(32)
    old = Harness.start(make_enclave(platform))
    old.create("v", config())
    alice = old.client("v")
    for i in range(4):
        old.call(alice, vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=bytes([i]))))
    new = Harness.start(make_enclave(platform))
    assert new.host.unseal(old.host.seal()) == ["v"]
    return old, new


def _refused(
    new: Harness,
    entries: list[envelope_pb2.LogEntry],
    head: envelope_pb2.CommitHead,
    signature: bytes,
    snapshot: envelope_pb2.EncryptedSnapshot | None = None,
) -> str:
    before = new.enclave.state_digest()
    with pytest.raises(EnclaveCallError) as refused:
        new.host.restore("v", entries, snapshot, keyvault_head=head, keyvault_head_signature=signature)
    assert refused.value.code == error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION
    assert refused.value.message.startswith("rollback refused")
    assert new.enclave.state_digest() == before
    assert not new.host.get_status().instances
    return refused.value.message


def test_a_valid_statement_restores(worlds: tuple[Harness, Harness]) -> None:
    old, new = worlds
    log = old.log["v"]
    for at in (0, 3, 5):  # no head yet, a head behind the database (crash before advance), equal
        head = _head(log[at - 1]) if at else envelope_pb2.CommitHead()
        restored = new.host.restore(
            "v", log, keyvault_head=head, keyvault_head_signature=head_statement(new.keys, "v", head)
        )
        assert (restored.sequence, restored.hash) == (5, wire.entry_hash(log[-1]))


def test_a_missing_or_foreign_statement_is_refused(worlds: tuple[Harness, Harness]) -> None:
    old, new = worlds
    log = old.log["v"]
    head = _head(log[-1])
    other_vault = ed25519.Ed25519PrivateKey.generate()
    assert "not signed" in _refused(new, log, head, b"")
    assert "not signed" in _refused(new, log, head, head_statement(new.keys, "v", head, other_vault))
    # Made for another enclave key (an earlier boot): not replayable to this one.
    assert "not signed" in _refused(new, log, head, head_statement(old.keys, "v", head))
    # Made for another instance, or for another head than the one sent.
    other = envelope_pb2.CommitHead(sequence=4, hash=wire.entry_hash(log[3]))
    assert "not signed" in _refused(new, log, head, head_statement(new.keys, "w", head))
    assert "not signed" in _refused(new, log, other, head_statement(new.keys, "v", head))


def test_a_log_older_than_or_forked_from_the_keyvault_head_is_refused(
    worlds: tuple[Harness, Harness],
) -> None:
    old, new = worlds
    log = old.log["v"]
    head = _head(log[-1])
    statement = head_statement(new.keys, "v", head)
    assert "before the keyvault head 5" in _refused(new, log[:2], head, statement)  # an old prefix
    forked = envelope_pb2.CommitHead(sequence=3, hash=bytes(32))
    assert "differs from the keyvault head" in _refused(
        new, log, forked, head_statement(new.keys, "v", forked)
    )


def test_a_snapshot_must_contain_the_keyvault_head(worlds: tuple[Harness, Harness]) -> None:
    old, new = worlds
    log = old.log["v"]
    snapshot = old.host.snapshot("v")  # at 5
    behind = _head(log[2])  # the keyvault head at 3: the entries 3..5 bridge to the snapshot

    def restore(entries: list[envelope_pb2.LogEntry], head: envelope_pb2.CommitHead) -> str:
        return _refused(new, entries, head, head_statement(new.keys, "v", head), snapshot)

    assert "does not chain" in restore([], behind)  # no bridge
    assert "does not chain" in restore(log[3:5], behind)  # the entry at the head is missing
    assert "does not chain" in restore([log[2], log[4]], behind)  # a gap
    assert "does not chain" in restore(log[2:5], envelope_pb2.CommitHead(sequence=3, hash=bytes(32)))
    forked = envelope_pb2.CommitHead(sequence=5, hash=bytes(32))
    assert "snapshot at 5 differs" in restore([], forked)
    assert "before the keyvault head 6" in restore([], envelope_pb2.CommitHead(sequence=6, hash=bytes(32)))
    for entries, head in ((log[2:5], behind), ([], _head(log[-1])), ([], envelope_pb2.CommitHead())):
        restored = new.host.restore(
            "v",
            entries,
            snapshot,
            keyvault_head=head,
            keyvault_head_signature=head_statement(new.keys, "v", head),
        )
        assert (restored.sequence, restored.hash) == (5, wire.entry_hash(log[-1]))
