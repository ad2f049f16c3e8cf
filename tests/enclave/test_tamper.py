"""Tamper tests: every altered ciphertext, wrong binding, replay or reorder is refused, and a
refusal changes nothing (the enclave's state digest is identical before and after)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.enclave.support import Client, Harness, Sealed, config, error_code, vault
from veil.enclave import commands, wire
from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.services.state.enclave_host import EnclaveCallError

PUT = vault(put=apps_pb2.VaultPut(record_id="r", data=b"secret"))


def _flip(data: bytes, bit: int) -> bytes:
    index = (bit // 8) % len(data)
    return data[:index] + bytes([data[index] ^ (1 << (bit % 8))]) + data[index + 1 :]


@pytest.fixture
def vault_harness(harness: Harness) -> tuple[Harness, Client]:
    harness.create("v", config())
    client = harness.client("v")
    assert error_code(harness.call(client, PUT)) == "OK"
    return harness, client


def _refused_unchanged(harness: Harness, sealed: Sealed) -> envelope_pb2.CommandOutcome:
    before = harness.enclave.state_digest()
    (outcome,) = harness.run("v", sealed)
    assert not outcome.accepted
    assert outcome.sequence == 0
    assert harness.enclave.state_digest() == before
    return outcome


# --- commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["encapsulated_key", "ciphertext"])
@pytest.mark.parametrize("bit", [0, 77, 255, 8 * 40 + 3])
def test_flipped_bit_in_a_sealed_command_is_refused(
    vault_harness: tuple[Harness, Client], field: str, bit: int
) -> None:
    harness, client = vault_harness
    sealed = client.seal(PUT)
    setattr(sealed.command, field, _flip(getattr(sealed.command, field), bit))
    outcome = _refused_unchanged(harness, sealed)
    assert outcome.error.message == "command could not be opened"
    assert not outcome.sealed_response  # no key to answer under


def test_wrong_suite_label_is_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, client = vault_harness
    sealed = client.seal(PUT)
    sealed.command.suite = envelope_pb2.HPKE_SUITE_MLKEM768X25519_SHA256_AES128GCM
    assert _refused_unchanged(harness, sealed).error.message == "command could not be opened"


def test_command_sealed_with_another_instance_aad_is_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, client = vault_harness
    outcome = _refused_unchanged(harness, client.seal(PUT, aad_instance="other"))
    assert outcome.error.message == "command could not be opened"


def test_command_for_another_instance_is_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, client = vault_harness
    harness.create("w", config())
    # Sealed correctly for "w" (HPKE aad and plaintext) but delivered to "v" by the host.
    sealed = client.seal(PUT, aad_instance="w", command_instance="w")
    assert _refused_unchanged(harness, sealed).error.message == "command could not be opened"
    # Plaintext names "w" but the aad says "v": refused too.
    sealed = client.seal(PUT, command_instance="w")
    assert _refused_unchanged(harness, sealed).error.message == "command could not be opened"


@pytest.mark.parametrize("request_id", ["", "x" * 65, "é" * 33, "row\n7", "tab\there", "\x00"])
def test_a_request_id_outside_the_one_rule_is_refused_unopened(
    vault_harness: tuple[Harness, Client], request_id: str
) -> None:
    """The enclave opens only what the gateway and the clients accept (commands.valid_request_id):
    an id it cannot answer under the same rule is refused as unopenable, unsealed."""
    harness, client = vault_harness
    assert not commands.valid_request_id(request_id)
    outcome = _refused_unchanged(harness, client.seal(PUT, request_id=request_id))
    assert outcome.error.message == "command could not be opened"
    assert not outcome.sealed_response


@pytest.mark.parametrize("request_id", ["r", "x" * 64, "é" * 32, "row 7", "ключ-1"])
def test_a_request_id_within_the_rule_runs(vault_harness: tuple[Harness, Client], request_id: str) -> None:
    harness, client = vault_harness
    assert commands.valid_request_id(request_id)
    (outcome,) = harness.run("v", client.seal(PUT, request_id=request_id))
    assert outcome.accepted


def test_replayed_command_is_refused_in_a_later_batch_and_in_the_same_batch(
    vault_harness: tuple[Harness, Client],
) -> None:
    harness, client = vault_harness
    sealed = client.seal(PUT)
    (first,) = harness.run("v", sealed)
    assert first.accepted
    replay = _refused_unchanged(harness, sealed)
    assert error_code(client.read(sealed, replay)) == "ABORTED"

    again = client.seal(PUT)
    before = harness.enclave.state_digest()
    outcomes = harness.run("v", again, again)
    assert [o.accepted for o in outcomes] == [True, False]
    assert error_code(client.read(again, outcomes[1])) == "ABORTED"
    assert harness.enclave.state_digest() != before  # only the first copy counted


def test_reordered_commands_are_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, client = vault_harness
    first, second = client.seal(PUT), client.seal(PUT)
    refused = _refused_unchanged(harness, second)  # arrives before its predecessor
    assert error_code(client.read(second, refused)) == "ABORTED"
    assert "counter must be" in client.read(second, refused).error.message
    (ok,) = harness.run("v", first)
    assert ok.accepted
    skipped = client.seal(PUT, counter=client.counter + 5)
    assert error_code(client.read(skipped, _refused_unchanged(harness, skipped))) == "ABORTED"


# --- responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0, 100, 8 * 12 + 1, -1])
def test_flipped_bit_in_a_response_fails_to_open(vault_harness: tuple[Harness, Client], bit: int) -> None:
    harness, client = vault_harness
    sealed = client.seal(PUT)
    (outcome,) = harness.run("v", sealed)
    response = outcome.sealed_response
    flipped = _flip(response, bit if bit >= 0 else 8 * len(response) - 1)
    with pytest.raises(DecryptionError, match=r"^decryption failed$"):
        commands.open_response(sealed.response_key, flipped, "v", sealed.request_id)
    with pytest.raises(DecryptionError):  # wrong AAD: the host swapped responses between requests
        commands.open_response(sealed.response_key, response, "v", "another-request")
    with pytest.raises(DecryptionError):
        commands.open_response(sealed.response_key, response, "w", sealed.request_id)


# --- log entries and snapshots -----------------------------------------------------------------


EntryTamper = Callable[[envelope_pb2.LogEntry], None]
ENTRY_TAMPERS: dict[str, EntryTamper] = {
    "ciphertext": lambda e: setattr(e, "ciphertext", _flip(e.ciphertext, 9)),
    "ciphertext-tag": lambda e: setattr(e, "ciphertext", _flip(e.ciphertext, 8 * len(e.ciphertext) - 1)),
    "nonce": lambda e: setattr(e, "nonce", _flip(e.nonce, 0)),
    "key_version": lambda e: setattr(e, "key_version", 2),
    "truncated": lambda e: setattr(e, "ciphertext", e.ciphertext[:-1]),
}


@pytest.mark.parametrize("tamper", sorted(ENTRY_TAMPERS))
@pytest.mark.parametrize("position", [0, 1, 2])
def test_tampered_log_entry_is_refused_on_restore(
    vault_harness: tuple[Harness, Client], tamper: str, position: int
) -> None:
    harness, client = vault_harness
    harness.call(client, PUT)
    harness.provision("v", 2)  # a second key version exists, so "wrong version" is a real key
    entries = [envelope_pb2.LogEntry.FromString(e.SerializeToString()) for e in harness.log["v"]]
    ENTRY_TAMPERS[tamper](entries[position])
    fresh = harness.restarted()
    before = fresh.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
        fresh.restore("v", entries)
    assert fresh.enclave.state_digest() == before


def test_broken_chain_and_reordered_entries_are_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, client = vault_harness
    harness.call(client, PUT)
    entries = harness.log["v"]
    fresh = harness.restarted()
    before = fresh.enclave.state_digest()
    for bad in ([entries[0], entries[2], entries[1]], entries[1:], [entries[0], entries[2]]):
        with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
            fresh.restore("v", bad)
    relabelled = envelope_pb2.LogEntry.FromString(entries[1].SerializeToString())
    relabelled.previous_hash = _flip(relabelled.previous_hash, 3)
    with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
        fresh.restore("v", [entries[0], relabelled])
    assert fresh.enclave.state_digest() == before
    assert fresh.restore("v", entries).sequence == 3  # the untouched log restores


@pytest.mark.parametrize("garbage", [b"\xff", b"\x0a\x05ab", b"\x00" * 3])
def test_an_unreadable_entry_is_refused_and_named(
    vault_harness: tuple[Harness, Client], garbage: bytes
) -> None:
    # Restore takes the entries as stored bytes; bytes that are no LogEntry at all are refused.
    harness, client = vault_harness
    harness.call(client, PUT)
    stored = [entry.SerializeToString() for entry in harness.log["v"]]
    fresh = harness.restarted()
    before = fresh.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match=r"DATA_LOSS.*entry 1 of the restore request is unreadable"):
        fresh.restore("v", [stored[0], garbage, *stored[2:]])
    assert fresh.enclave.state_digest() == before
    assert fresh.restore("v", stored).sequence == len(stored)


def test_entry_under_an_unprovisioned_key_version_is_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, _ = vault_harness
    entry = envelope_pb2.LogEntry.FromString(harness.log["v"][0].SerializeToString())
    entry.key_version = 9
    fresh = harness.restarted()
    before = fresh.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="FAILED_PRECONDITION"):
        fresh.restore("v", [entry])
    assert fresh.enclave.state_digest() == before


SnapshotTamper = Callable[[envelope_pb2.EncryptedSnapshot], None]
SNAPSHOT_TAMPERS: dict[str, SnapshotTamper] = {
    "ciphertext": lambda s: setattr(s, "ciphertext", _flip(s.ciphertext, 17)),
    "nonce": lambda s: setattr(s, "nonce", _flip(s.nonce, 5)),
    "head-sequence": lambda s: setattr(s.head, "sequence", s.head.sequence + 1),
    "head-hash": lambda s: setattr(s.head, "hash", _flip(s.head.hash, 0)),
    "key_version": lambda s: setattr(s, "key_version", 1),  # an older, real key
}


@pytest.mark.parametrize("tamper", sorted(SNAPSHOT_TAMPERS))
def test_tampered_snapshot_is_refused(vault_harness: tuple[Harness, Client], tamper: str) -> None:
    harness, _ = vault_harness
    harness.provision("v", 2)
    snapshot = harness.host.snapshot("v")
    assert snapshot.key_version == 2  # snapshots use the newest key
    harness.restarted().restore("v", [], snapshot)  # the untouched snapshot restores
    SNAPSHOT_TAMPERS[tamper](snapshot)
    fresh = harness.restarted()
    before = fresh.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
        fresh.restore("v", [], snapshot)
    assert fresh.enclave.state_digest() == before


def test_snapshot_of_another_instance_is_refused(vault_harness: tuple[Harness, Client]) -> None:
    harness, _ = vault_harness
    harness.create("w", config())
    snapshot = harness.host.snapshot("w")
    snapshot.instance_id = "v"  # relabelled: the key and the AAD no longer match
    with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
        harness.restarted().restore("v", [], snapshot)


# --- keys --------------------------------------------------------------------------------------


def test_tampered_or_misdirected_wrapped_key_is_refused(harness: Harness) -> None:
    from tests.enclave.support import release_signature, wrap_key

    before = harness.enclave.state_digest()
    wrapped = wrap_key(harness.keys, "v", 1, bytes(32))
    tampered = [
        envelope_pb2.WrappedKey(
            suite=wrapped.suite,
            encapsulated_key=wrapped.encapsulated_key,
            ciphertext=_flip(wrapped.ciphertext, 1),
        ),
        envelope_pb2.WrappedKey(
            suite=wrapped.suite,
            encapsulated_key=_flip(wrapped.encapsulated_key, 1),
            ciphertext=wrapped.ciphertext,
        ),
    ]
    for bad in tampered:
        bad.signature = wrapped.signature  # the signature covers enc and ciphertext
        with pytest.raises(EnclaveCallError, match="PERMISSION_DENIED"):
            harness.host.provision_key("v", 1, bad)
        # Even a keyvault-signed blob must still open under HPKE (name, version and recipient).
        bad.signature = release_signature(bad, "instance.v", 1, harness.keys.hpke_x25519_public_key)
        with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT: wrapped key: decryption failed"):
            harness.host.provision_key("v", 1, bad)
    with pytest.raises(EnclaveCallError, match="PERMISSION_DENIED"):  # released for "v", installed as "w"
        harness.host.provision_key("w", 1, wrapped)
    with pytest.raises(EnclaveCallError, match="PERMISSION_DENIED"):  # released as version 1, installed as 2
        harness.host.provision_key("v", 2, wrapped)
    short_enc = envelope_pb2.WrappedKey()
    short_enc.CopyFrom(wrapped)
    short_enc.encapsulated_key = wrapped.encapsulated_key[:31]
    with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT: wrapped keys use the X25519"):
        harness.host.provision_key("v", 1, short_enc)
    assert harness.enclave.state_digest() == before
    harness.host.provision_key("v", 1, wrapped)
    with pytest.raises(EnclaveCallError, match="ALREADY_EXISTS"):  # no silent key swap
        harness.host.provision_key("v", 1, wrap_key(harness.keys, "v", 1, b"\x01" * 32))


def test_no_key_no_instance_and_no_batch(harness: Harness) -> None:
    with pytest.raises(EnclaveCallError, match="FAILED_PRECONDITION"):
        harness.create_raw("v", config())
    assert bytes(32) == wire.ZERO_HASH
