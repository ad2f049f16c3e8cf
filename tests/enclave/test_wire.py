"""Known-answer tests: HPKE (RFC 9180 A.1.1), AES-256-GCM, and every canonical byte encoding.

The encodings are spelled out here byte by byte, independently of veil.enclave.wire, so a change to
any of them (which would break the SDK or the keyvault) fails a test.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.enclave.support import PQ, Harness, config, error_code, vault
from veil.enclave import crypto, wire
from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2
from veil.services.keyvault.keys import release_info

# RFC 9180 A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode, sequence 0.
RFC_SKRM = "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8"
RFC_ENC = "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431"
RFC_INFO = "4f6465206f6e2061204772656369616e2055726e"
RFC_AAD = "436f756e742d30"
RFC_PT = "4265617574792069732074727574682c20747275746820626561757479"
RFC_CT = "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"


def test_hpke_with_aad_matches_rfc9180_vector() -> None:
    key = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC_SKRM))
    suite = crypto._SUITES[crypto.X25519_SUITE]
    sealed = bytes.fromhex(RFC_ENC + RFC_CT)
    opened = crypto._decrypt_with_aad(
        suite, sealed, key, info=bytes.fromhex(RFC_INFO), aad=bytes.fromhex(RFC_AAD)
    )
    assert opened == bytes.fromhex(RFC_PT)


def test_keyvault_wrapping_without_aad_opens_with_empty_aad() -> None:
    keys = crypto.HpkeKeyPairs()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    sealed = suite.encrypt(b"k" * 32, x25519.X25519PublicKey.from_public_bytes(keys.x25519_public), info=b"i")
    assert keys.open(crypto.X25519_SUITE, sealed[:32], sealed[32:], info=b"i", aad=b"") == b"k" * 32


@pytest.mark.parametrize("suite", [crypto.X25519_SUITE, crypto.MLKEM768X25519_SUITE])
def test_hpke_round_trip_and_opaque_failures(suite: int) -> None:
    keys = crypto.HpkeKeyPairs()
    public = keys.x25519_public if suite == crypto.X25519_SUITE else keys.hybrid_public
    enc, ciphertext = crypto.hpke_seal(suite, public, b"command", info=wire.COMMAND_INFO, aad=b"v")
    assert keys.open(suite, enc, ciphertext, info=wire.COMMAND_INFO, aad=b"v") == b"command"
    for bad in [
        (suite, enc, ciphertext, wire.COMMAND_INFO, b"w"),
        (suite, enc, ciphertext, b"veil/other/v1", b"v"),
        (suite, enc[:-1], ciphertext, wire.COMMAND_INFO, b"v"),
        (suite, enc, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), wire.COMMAND_INFO, b"v"),
        (0, enc, ciphertext, wire.COMMAND_INFO, b"v"),
    ]:
        with pytest.raises(DecryptionError, match=r"^decryption failed$"):
            keys.open(bad[0], bad[1], bad[2], info=bad[3], aad=bad[4])


def test_aes_256_gcm_known_answers() -> None:
    # McGrew & Viega, GCM test cases 13 and 14 (AES-256, zero key and IV).
    assert AESGCM(bytes(32)).encrypt(bytes(12), b"", None).hex() == "530f8afbc74536b9a963b4f1c4cb738b"
    assert (
        crypto.aead_open(bytes(32), bytes(12), bytes.fromhex("530f8afbc74536b9a963b4f1c4cb738b"), b"") == b""
    )
    ct = bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
    assert crypto.aead_open(bytes(32), bytes(12), ct, b"") == bytes(16)
    with pytest.raises(DecryptionError):
        crypto.aead_open(bytes(32), bytes(12), ct, b"aad")
    with pytest.raises(DecryptionError):
        crypto.aead_open(bytes(31), bytes(12), ct, b"")


def test_key_release_info_matches_the_keyvault() -> None:
    expected = b"veil/key-release/v1" + b"\x00\x0a" + b"instance.v" + b"\x00\x00\x00\x07"
    assert wire.key_release_info(wire.instance_key_name("v"), 7) == expected
    assert release_info("instance.v", 7) == expected


def test_wrapped_key_signing_bytes_and_sealed_keys_aad() -> None:
    recipient, enc, ciphertext = b"R" * 32, b"E" * 32, b"C" * 48
    assert wire.wrapped_key_signing_bytes("instance.v", 7, recipient, enc, ciphertext) == (
        b"veil/wrapped-key/v1"
        + b"\x00\x0ainstance.v"
        + b"\x00\x00\x00\x07"
        + b"\x00\x20"
        + recipient
        + b"\x00\x20"
        + enc
        + b"\x00\x00\x00\x30"
        + ciphertext
    )
    # Lengths make the fields unambiguous: moving a byte between enc and ciphertext changes the bytes.
    assert wire.wrapped_key_signing_bytes("instance.v", 7, recipient, enc + b"C", ciphertext[1:]) != (
        wire.wrapped_key_signing_bytes("instance.v", 7, recipient, enc, ciphertext)
    )
    pinned = b"K" * 32
    assert wire.sealed_keys_aad(pinned) == b"veil/sealed-keys/v2\x00\x20" + pinned


def test_report_data_binds_only_the_runtime_data_and_a_32_byte_nonce() -> None:
    runtime, nonce = b"keys", b"n" * 32
    expected = hashlib.sha256(b"veil/report-data/v1" + b"\x00\x00\x00\x04keys" + b"\x00\x20" + nonce).digest()
    assert wire.report_data(runtime, nonce) == expected + bytes(32)
    for bad in (b"", b"n" * 31, b"n" * 33, b"n" * 64):
        with pytest.raises(ValueError, match="nonce must be 32 bytes"):
            wire.report_data(runtime, bad)


def test_head_statement_and_confirmation_bytes() -> None:
    h, g, c = b"h" * 32, b"g" * 32, b"c" * 32
    statement = envelope_pb2.HeadStatement(
        instance_id="abc",
        challenge=b"x" * 32,
        enclave_signing_public_key=b"k" * 32,
        head=envelope_pb2.CommitHead(sequence=42, hash=h),
        genesis_hash=g,
        config_hash=c,
        not_after_unix_ms=7,
    )
    assert wire.head_statement_bytes(statement) == (
        b"veil/head-statement/v1\x00\x03abc"
        + b"\x00\x20" + b"x" * 32
        + b"\x00\x20" + b"k" * 32
        + struct.pack(">Q", 42)
        + b"\x00\x20" + h
        + b"\x00\x20" + g
        + b"\x00\x20" + c
        + struct.pack(">Q", 7)
    )  # fmt: skip
    absent = envelope_pb2.HeadStatement(
        instance_id="abc", challenge=b"x" * 32, enclave_signing_public_key=b"k" * 32
    )
    assert wire.head_statement_bytes(absent) == (
        b"veil/head-statement/v1\x00\x03abc\x00\x20" + b"x" * 32 + b"\x00\x20" + b"k" * 32
        + bytes(8) + b"\x00\x00" * 3 + bytes(8)
    )  # fmt: skip
    assert wire.head_confirmation_bytes("abc", 42, h, b"k" * 32) == (
        b"veil/head-confirmation/v1\x00\x03abc" + struct.pack(">Q", 42) + h + b"\x00\x20" + b"k" * 32
    )


def test_commit_link_descriptor_and_held_answer_bytes() -> None:
    g, c, b, h = b"g" * 32, b"c" * 32, b"b" * 32, b"h" * 32
    link = envelope_pb2.CommitLink(
        instance_id="abc",
        genesis_hash=g,
        config_hash=c,
        base=envelope_pb2.CommitHead(sequence=3, hash=b),
        head=envelope_pb2.CommitHead(sequence=9, hash=h),
    )
    assert wire.commit_link_bytes(link) == (
        b"veil/commit-link/v1\x00\x03abc" + g + c + struct.pack(">Q", 3) + b + struct.pack(">Q", 9) + h
    )
    assert wire.instance_descriptor_bytes("abc", c, g) == b"veil/instance/v1\x00\x03abc" + c + g
    assert wire.config_hash(b"cfg") == hashlib.sha256(b"cfg").digest()
    assert wire.held_response_aad("abc", 9) == b"veil/held-response/v1\x00\x03abc" + struct.pack(">Q", 9)
    assert wire.held_read_aad("abc", 9) == b"veil/held-read/v1\x00\x03abc" + struct.pack(">Q", 9)
    link.base.hash = b"short"
    with pytest.raises(ValueError, match="base hash"):
        wire.commit_link_bytes(link)


def test_receipt_and_command_signing_bytes() -> None:
    c, r = b"c" * 32, b"r" * 32
    receipt = envelope_pb2.Receipt(
        kind=envelope_pb2.RECEIPT_KIND_COMMAND, instance_id="v", sequence=5, command_hash=c, result_hash=r
    )
    receipt.signature = b"not covered"  # the signature never signs itself
    assert (
        wire.receipt_signing_bytes(receipt) == b"veil/receipt/v1\x01\x00\x01v" + struct.pack(">Q", 5) + c + r
    )
    assert wire.command_signing_bytes(
        instance_id="v", counter=3, request_id="id", response_key=b"K", call=b"CALL"
    ) == (
        b"veil/command-signature/v1\x00\x01v"
        + struct.pack(">Q", 3)
        + b"\x00\x02id\x00\x01K\x00\x00\x00\x04CALL"
    )
    command = command_pb2.Command(
        instance_id="v", counter=3, request_id="id", response_key=b"K", call=b"CALL"
    )
    command.auth.signature.signature = b"not covered"  # the proof never signs itself
    assert wire.command_proof_bytes(command) == wire.command_signing_bytes(
        instance_id="v", counter=3, request_id="id", response_key=b"K", call=b"CALL"
    )
    receipt.command_hash = b"short"
    with pytest.raises(ValueError, match="32 bytes"):
        wire.receipt_signing_bytes(receipt)


def test_entry_hash_and_aads() -> None:
    previous = hashlib.sha256(b"p").digest()
    entry = envelope_pb2.LogEntry(
        instance_id="v", sequence=2, key_version=1, previous_hash=previous, nonce=b"n" * 12, ciphertext=b"ct"
    )
    encoded = (
        b"veil/log-entry-hash/v1\x00\x01v"
        + struct.pack(">QI", 2, 1)
        + previous
        + b"\x00\x0c"
        + b"n" * 12
        + b"\x00\x00\x00\x02ct"
    )
    assert wire.entry_hash(entry) == hashlib.sha256(encoded).digest()
    assert (
        wire.entry_aad("v", 2, 1, previous)
        == b"veil/log-entry/v1\x00\x01v" + struct.pack(">QI", 2, 1) + previous
    )
    assert (
        wire.snapshot_aad("v", 2, previous, 1)
        == b"veil/snapshot/v1\x00\x01v" + struct.pack(">Q", 2) + previous + b"\x00\x00\x00\x01"
    )
    assert wire.response_aad("v", "id") == b"veil/response/v1\x00\x01v\x00\x02id"
    assert wire.command_aad("v") == b"v"
    assert wire.command_hash(b"E", b"C") == hashlib.sha256(b"EC").digest()


def test_vote_commitment_encoding() -> None:
    salt = secrets.token_bytes(16)
    encoded = b"veil/ballot-vote/v1\x00\x02q1\x00\x03ann" + struct.pack(">I", 2) + b"\x00\x10" + salt
    assert wire.vote_commitment("q1", "ann", 2, salt) == hashlib.sha256(encoded).digest()


def test_post_quantum_sealed_commands_execute(harness: Harness) -> None:
    harness.create("v", config())
    client = harness.client("v")
    sealed = client.seal(vault(put=apps_pb2.VaultPut(record_id="r", data=b"pq")), suite=PQ)
    assert len(sealed.command.encapsulated_key) == 1120
    (outcome,) = harness.run("v", sealed)
    assert outcome.accepted
    assert error_code(client.read(sealed, outcome)) == "OK"


def test_entry_hash_and_aad_known_answer_at_the_field_limits() -> None:
    previous = b"\xab" * 32
    entry = envelope_pb2.LogEntry(
        instance_id="\u00e9",
        sequence=2**64 - 1,
        key_version=2**32 - 1,
        previous_hash=previous,
        nonce=b"",
        ciphertext=b"",
    )
    place = (2**64 - 1).to_bytes(8, "big") + (2**32 - 1).to_bytes(4, "big")
    encoded = b"veil/log-entry-hash/v1\x00\x02\xc3\xa9" + place + previous + b"\x00\x00" + b"\x00\x00\x00\x00"
    assert wire.entry_hash(entry) == hashlib.sha256(encoded).digest()
    aad = b"veil/log-entry/v1\x00\x02\xc3\xa9" + place + previous
    assert wire.entry_aad("\u00e9", 2**64 - 1, 2**32 - 1, previous) == aad
    with pytest.raises(OverflowError):  # a nonce whose length does not fit its 2-byte prefix
        wire.entry_hash(envelope_pb2.LogEntry(instance_id="v", previous_hash=previous, nonce=b"\0" * 65536))


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 from hmac alone (no salt: a zero-filled one), to check the enclave's HKDF use."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_hold_key_is_hkdf_of_the_data_keys_hold_root_over_the_head_and_the_boot() -> None:
    data_key, head_hash, signer = bytes(range(32)), bytes([7]) * 32, bytes([9]) * 32
    root = wire.hold_root(data_key)
    assert root == _hkdf_sha256(data_key, b"veil/hold-root/v1", 32)
    info = b"veil/hold-key/v1" + b"\x00\x03abc" + (5).to_bytes(8, "big") + head_hash + b"\x00\x20" + signer
    key = wire.hold_key(root, "abc", 5, head_hash, signer)
    assert key == _hkdf_sha256(root, info, 32)
    assert key.hex() == "1bbf1ef9b4a700d876d75ba1f5bb6f372f70503d520d086869243c4c0a0c94f4"
    assert wire.hold_key_check(key) == hashlib.sha256(b"veil/hold-key-check/v1" + key).digest()
    # Every input changes the key: another head, another boot, another instance, another data key.
    others = {
        wire.hold_key(root, "abc", 6, head_hash, signer),
        wire.hold_key(root, "abc", 5, bytes(32), signer),
        wire.hold_key(root, "abc", 5, head_hash, bytes(32)),
        wire.hold_key(root, "abd", 5, head_hash, signer),
        wire.hold_key(wire.hold_root(bytes(32)), "abc", 5, head_hash, signer),
    }
    assert key not in others
    assert len(others) == 5
    with pytest.raises(ValueError, match="head hash"):
        wire.hold_key(root, "abc", 5, b"short", signer)
