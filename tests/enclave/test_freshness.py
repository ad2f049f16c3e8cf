"""Create and Restore check freshness themselves, against a hostile host.

The keyvault's HeadStatement must be for this instance, this enclave boot and the challenge the
enclave issued last (single use), unexpired and signed by the pinned keyvault; the restored log
must contain the stated head and the registered genesis; a loaded instance is never replaced,
so within one boot an instance only moves forward; and an instance the keyvault already holds
cannot be created again. Every refusal leaves the enclave exactly as it was (bar the challenge,
which an attempt uses up).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.enclave.support import NOW_MS, Harness, config, head_statement, vault
from veil.enclave import wire
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.services.state.enclave_host import EnclaveCallError


def _head(entry: envelope_pb2.LogEntry) -> envelope_pb2.CommitHead:
    return envelope_pb2.CommitHead(sequence=entry.sequence, hash=wire.entry_hash(entry))


@pytest.fixture
def old(harness: Harness) -> Harness:
    """An enclave with a 5-entry log of "v", all of it confirmed by the test keyvault."""
    harness.create("v", config())
    alice = harness.client("v")
    for i in range(4):
        harness.call(alice, vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=bytes([i]))))
    assert harness.keyvault["v"].head.sequence == 5
    return harness


def _statement(
    new: Harness, head: envelope_pb2.CommitHead | None = None, **changes: object
) -> envelope_pb2.HeadStatement:
    """A statement for `new`'s current challenge of `head` (default: the keyvault's), then `changes`."""
    statement = new.statement("v", head)
    for name, value in changes.items():
        if name == "signer":
            continue
        setattr(statement, name, value)
    signer = changes.get("signer")
    key = signer if isinstance(signer, ed25519.Ed25519PrivateKey) else None
    if changes:
        from tests.enclave.support import KEYVAULT_RELEASE_KEY

        statement.signature = (key or KEYVAULT_RELEASE_KEY).sign(wire.head_statement_bytes(statement))
    return statement


def _refused(
    new: Harness,
    entries: list[envelope_pb2.LogEntry],
    statement: envelope_pb2.HeadStatement,
    snapshot: envelope_pb2.EncryptedSnapshot | None = None,
    code: int = error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION,
) -> str:
    before = new.enclave.state_digest()
    with pytest.raises(EnclaveCallError) as refused:
        new.host.restore("v", entries, snapshot, statement=statement, host_time_unix_ms=NOW_MS)
    assert refused.value.code == code, refused.value
    assert new.enclave.state_digest() == before
    assert not new.host.get_status().instances
    return refused.value.message


def test_a_valid_statement_restores_and_links_what_the_keyvault_has_not_seen(old: Harness) -> None:
    log = old.log["v"]
    for at in (3, 5):  # a head behind the database (crash before advance), equal
        new = old.restarted()
        restored = new.host.restore(
            "v", log, statement=new.statement("v", _head(log[at - 1])), host_time_unix_ms=NOW_MS
        )
        assert (restored.head.sequence, restored.head.hash) == (5, wire.entry_hash(log[-1]))
        if at == 5:  # the keyvault stated this very head to this boot: registered at once
            assert not restored.HasField("link")
            assert wire.verify_instance_descriptor(restored.descriptor, new.keys.signing_public_key)
            assert restored.descriptor.genesis_hash == wire.entry_hash(log[0])
        else:  # entries the keyvault has not seen: no descriptor until it confirms the link
            assert not restored.HasField("descriptor")
            assert (restored.link.base.sequence, restored.link.head.sequence) == (3, 5)
            assert wire.verify_commit_link(restored.link, new.keys.signing_public_key)


def test_a_missing_stale_or_foreign_statement_is_refused(old: Harness) -> None:
    log = old.log["v"]
    new = old.restarted()
    other_vault = ed25519.Ed25519PrivateKey.generate()
    assert "not signed by the pinned keyvault" in _refused(new, log, _statement(new, signer=other_vault))
    assert "current challenge" in _refused(new, log, _statement(new, challenge=bytes(32)))
    # Made for another enclave key (an earlier boot): not replayable to this one.
    assert "for another enclave" in _refused(
        new, log, _statement(new, enclave_signing_public_key=old.keys.signing_public_key)
    )
    assert "expired" in _refused(new, log, _statement(new, not_after_unix_ms=NOW_MS - 1))
    # A statement about another head than the one signed.
    tampered = new.statement("v")
    tampered.head.sequence = 4
    assert "not signed" in _refused(new, log, tampered)
    assert "malformed" in _refused(
        new, log, _statement(new, instance_id="w"), code=error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT
    )
    # Single use: the challenge is gone after one attempt, even a refused one.
    statement = new.statement("v")
    _refused(new, log[:2], statement)
    assert "current challenge" in _refused(new, log, statement)
    # And a newer challenge replaces an older one.
    first = new.statement("v")
    new.host.issue_challenge("v")
    assert "current challenge" in _refused(new, log, first)
    assert new.restore("v", log).sequence == 5


def test_a_log_older_than_or_forked_from_the_keyvault_head_is_refused(old: Harness) -> None:
    log = old.log["v"]
    new = old.restarted()
    assert "before the keyvault head 5" in _refused(new, log[:2], new.statement("v"))  # an old prefix
    forked = envelope_pb2.CommitHead(sequence=3, hash=bytes(32))
    assert "differs from the keyvault head" in _refused(new, log, new.statement("v", forked))
    # The right head but another registered genesis: a log created elsewhere under this id.
    assert "genesis" in _refused(new, log, _statement(new, genesis_hash=b"\x07" * 32))
    assert "genesis" in _refused(new, log, _statement(new, config_hash=b"\x07" * 32))


def test_a_snapshot_must_contain_the_keyvault_head(old: Harness) -> None:
    log = old.log["v"]
    snapshot = old.host.snapshot("v")  # at 5
    behind = _head(log[2])  # the keyvault head at 3: the entries 3..5 bridge to the snapshot
    new = old.restarted()

    def restore(entries: list[envelope_pb2.LogEntry], head: envelope_pb2.CommitHead) -> str:
        return _refused(new, entries, new.statement("v", head), snapshot)

    assert "does not chain" in restore([], behind)  # no bridge
    assert "does not chain" in restore(log[3:5], behind)  # the entry at the head is missing
    assert "does not chain" in restore([log[2], log[4]], behind)  # a gap
    assert "does not chain" in restore(log[2:5], envelope_pb2.CommitHead(sequence=3, hash=bytes(32)))
    assert "snapshot at 5 differs" in restore([], envelope_pb2.CommitHead(sequence=5, hash=bytes(32)))
    assert "before the keyvault head 6" in restore([], envelope_pb2.CommitHead(sequence=6, hash=bytes(32)))
    for entries, head in ((log[2:5], behind), ([], _head(log[-1]))):
        fresh = old.restarted()
        restored = fresh.restore("v", entries, snapshot, keyvault_head=head)
        assert (restored.sequence, restored.hash) == (5, wire.entry_hash(log[-1]))


def test_a_loaded_instance_is_never_replaced_within_one_boot(old: Harness) -> None:
    """The rewind oracle: restoring a live instance back to an earlier head is refused."""
    log = old.log["v"]
    before = old.enclave.state_digest()
    for entries, head in ((log[:3], _head(log[2])), (log, _head(log[-1]))):
        with pytest.raises(EnclaveCallError, match="ALREADY_EXISTS: instance is loaded"):
            old.host.restore("v", entries, statement=old.statement("v", head), host_time_unix_ms=NOW_MS)
    assert old.enclave.state_digest() == before


def test_an_instance_the_keyvault_holds_cannot_be_created_again(old: Harness) -> None:
    """The fork takeover: a second enclave with the real key may not start its own "v"."""
    other = old.restarted()
    before = other.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="ALREADY_EXISTS: the keyvault holds this instance"):
        other.create_raw("v", config(envelope_pb2.APP_KIND_VAULT, envelope_pb2.AUTH_SCHEME_NONE))
    assert other.enclave.state_digest() == before
    # Without any statement (or an unsigned one) there is no creation at all.
    with pytest.raises(EnclaveCallError, match="current challenge"):
        other.host.create_instance("w", config(), head_statement(other.keys, "w", bytes(32)), NOW_MS)
