"""Canonical byte encodings: every signed, hashed or authenticated byte string, in one place.

The client SDK, the keyvault and the enclave must agree on these bytes exactly, so each one is
built by exactly one function here and nowhere else. Notation (all integers big-endian):

    u8/u16/u32/u64(n)  n as 1/2/4/8 bytes
    str16(s)           u16(len(utf8(s))) || utf8(s)
    bytes16(b)         u16(len(b)) || b
    bytes32(b)         u32(len(b)) || b

HPKE (RFC 9180, base mode, single shot):
    command:      info = "veil/command/v1", aad = utf8(instance_id)
    key release:  info = key_release_info(key_name, version), no aad; key_name = "instance.<id>"

Signed by the keyvault's Ed25519 release key (pinned in the enclave at Initialize):
    wrapped key:  "veil/wrapped-key/v1" || str16(key_name) || u32(version)
                  || bytes16(recipient_hpke_public_key) || bytes16(encapsulated_key)
                  || bytes32(ciphertext)
    head freshness: "veil/head-freshness/v1" || str16(instance_id) || u64(sequence)
                  || bytes16(hash) || bytes16(enclave_signing_public_key)
                  (GetCommitHead's statement, checked by Restore; sequence 0 = no head)
Signed by the enclave's Ed25519 key:
    commit head:  "veil/commit-head/v1" || str16(instance_id) || u64(sequence) || hash(32)
    receipt:      "veil/receipt/v1" || u8(kind) || str16(instance_id) || u64(sequence)
                  || command_hash(32) || result_hash(32)
Signed by a client (AUTH_SCHEME_SIGNATURE):
    command:      "veil/command-signature/v1" || str16(instance_id) || u64(counter)
                  || str16(request_id) || bytes16(response_key) || bytes32(call)
AES-256-GCM additional data:
    log entry:    "veil/log-entry/v1" || str16(instance_id) || u64(sequence) || u32(key_version)
                  || previous_hash(32)
    snapshot:     "veil/snapshot/v1" || str16(instance_id) || u64(head.sequence) || head.hash(32)
                  || u32(key_version)
    response:     "veil/response/v1" || str16(instance_id) || str16(request_id)
    sealed keys:  "veil/sealed-keys/v2" || bytes16(keyvault_release_public_key)
Hashes (SHA-256):
    command hash: SHA-256(encapsulated_key || ciphertext) of the SealedCommand
                  (the encapsulated key has a fixed length per suite, so this is unambiguous)
    entry hash:   SHA-256("veil/log-entry-hash/v1" || str16(instance_id) || u64(sequence)
                  || u32(key_version) || previous_hash(32) || bytes16(nonce) || bytes32(ciphertext))
    result hash:  SHA-256(CommandResponse.result)
    ballot vote:  SHA-256("veil/ballot-vote/v1" || str16(ballot_id) || str16(voter) || u32(option)
                  || bytes16(salt))   (the tally's Merkle leaves; see enclave.apps.merkle)
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from veil.enclave.v1 import envelope_pb2

COMMAND_INFO = b"veil/command/v1"
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)

_KEY_RELEASE = b"veil/key-release/v1"
_WRAPPED_KEY = b"veil/wrapped-key/v1"
_SEALED_KEYS = b"veil/sealed-keys/v2"  # v2: binds the pinned keyvault release key
_COMMIT_HEAD = b"veil/commit-head/v1"
_HEAD_FRESHNESS = b"veil/head-freshness/v1"
_RECEIPT = b"veil/receipt/v1"
_COMMAND_SIGNATURE = b"veil/command-signature/v1"
_LOG_ENTRY = b"veil/log-entry/v1"
_LOG_ENTRY_HASH = b"veil/log-entry-hash/v1"
_SNAPSHOT = b"veil/snapshot/v1"
_RESPONSE = b"veil/response/v1"
_BALLOT_VOTE = b"veil/ballot-vote/v1"


def _u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")  # OverflowError for values that do not fit


def _prefixed(data: bytes, size: int) -> bytes:
    return _u(len(data), size) + data


def _str16(text: str) -> bytes:
    return _prefixed(text.encode("utf-8"), 2)


def _hash32(value: bytes, what: str) -> bytes:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes")
    return value


def instance_key_name(instance_id: str) -> str:
    """The keyvault's key name for an instance's data key."""
    return f"instance.{instance_id}"


def key_release_info(key_name: str, version: int) -> bytes:
    """HPKE info binding a released data key to its keyvault name and version."""
    return _KEY_RELEASE + _str16(key_name) + _u(version, 4)


def wrapped_key_signing_bytes(
    key_name: str,
    version: int,
    recipient_hpke_public_key: bytes,
    encapsulated_key: bytes,
    ciphertext: bytes,
) -> bytes:
    """What the keyvault signs for a released key: name, version, recipient and the HPKE output.

    HPKE base mode does not authenticate the sender, so this signature is what tells the
    enclave the key came from the keyvault and not from the host.
    """
    return (
        _WRAPPED_KEY
        + _str16(key_name)
        + _u(version, 4)
        + _prefixed(recipient_hpke_public_key, 2)
        + _prefixed(encapsulated_key, 2)
        + _prefixed(ciphertext, 4)
    )


def sealed_keys_aad(keyvault_release_public_key: bytes) -> bytes:
    """Sealing aad of the key cache: it opens only in an enclave pinned to the same keyvault."""
    return _SEALED_KEYS + _prefixed(keyvault_release_public_key, 2)


def head_freshness_bytes(
    instance_id: str, sequence: int, head_hash: bytes, enclave_signing_public_key: bytes
) -> bytes:
    """What the keyvault signs for GetCommitHead: this is the head, for this enclave boot only.

    The enclave's signing key is fresh per Initialize, so a statement cannot be replayed to a
    later enclave (which could then restore a log older than the head the keyvault has since).
    """
    return (
        _HEAD_FRESHNESS
        + _str16(instance_id)
        + _u(sequence, 8)
        + _prefixed(head_hash, 2)
        + _prefixed(enclave_signing_public_key, 2)
    )


def command_aad(instance_id: str) -> bytes:
    """HPKE aad of a sealed command: a command sealed for one instance opens for no other."""
    return instance_id.encode("utf-8")


def command_hash(encapsulated_key: bytes, ciphertext: bytes) -> bytes:
    """The hash that names a sealed command in receipts and log entries."""
    return hashlib.sha256(encapsulated_key + ciphertext).digest()


def command_signing_bytes(
    *, instance_id: str, counter: int, request_id: str, response_key: bytes, call: bytes
) -> bytes:
    """What a client signs under AUTH_SCHEME_SIGNATURE: the whole command except the proof."""
    return (
        _COMMAND_SIGNATURE
        + _str16(instance_id)
        + _u(counter, 8)
        + _str16(request_id)
        + _prefixed(response_key, 2)
        + _prefixed(call, 4)
    )


def commit_head_signing_bytes(instance_id: str, sequence: int, head_hash: bytes) -> bytes:
    """What the enclave signs for a commit head (the keyvault verifies exactly these bytes)."""
    return _COMMIT_HEAD + _str16(instance_id) + _u(sequence, 8) + _hash32(head_hash, "head hash")


def receipt_signing_bytes(
    *, kind: int, instance_id: str, sequence: int, command_hash: bytes, result_hash: bytes
) -> bytes:
    """What the enclave signs for a receipt over (kind, instance, sequence, command, result)."""
    return (
        _RECEIPT
        + _u(kind, 1)
        + _str16(instance_id)
        + _u(sequence, 8)
        + _hash32(command_hash, "command hash")
        + _hash32(result_hash, "result hash")
    )


def verify_receipt(receipt: envelope_pb2.Receipt, signing_public_key: bytes) -> bool:
    """True when `receipt` carries a valid enclave signature (for the SDK and tests)."""
    try:
        message = receipt_signing_bytes(
            kind=receipt.kind,
            instance_id=receipt.instance_id,
            sequence=receipt.sequence,
            command_hash=receipt.command_hash,
            result_hash=receipt.result_hash,
        )
        ed25519.Ed25519PublicKey.from_public_bytes(signing_public_key).verify(receipt.signature, message)
    except (ValueError, InvalidSignature):
        return False
    return True


def verify_commit_head(head: envelope_pb2.SignedCommitHead, signing_public_key: bytes) -> bool:
    """True when `head` carries a valid enclave signature."""
    try:
        message = commit_head_signing_bytes(head.instance_id, head.head.sequence, head.head.hash)
        ed25519.Ed25519PublicKey.from_public_bytes(signing_public_key).verify(head.signature, message)
    except (ValueError, InvalidSignature):
        return False
    return True


def entry_aad(instance_id: str, sequence: int, key_version: int, previous_hash: bytes) -> bytes:
    """AES-GCM aad of a log entry: binds its place in the hash chain and its key version."""
    return (
        _LOG_ENTRY
        + _str16(instance_id)
        + _u(sequence, 8)
        + _u(key_version, 4)
        + _hash32(previous_hash, "previous hash")
    )


def entry_hash(entry: envelope_pb2.LogEntry) -> bytes:
    """The hash chaining a log entry to the next one (and naming the commit head)."""
    encoded = (
        _LOG_ENTRY_HASH
        + _str16(entry.instance_id)
        + _u(entry.sequence, 8)
        + _u(entry.key_version, 4)
        + _hash32(entry.previous_hash, "previous hash")
        + _prefixed(entry.nonce, 2)
        + _prefixed(entry.ciphertext, 4)
    )
    return hashlib.sha256(encoded).digest()


def snapshot_aad(instance_id: str, head_sequence: int, head_hash: bytes, key_version: int) -> bytes:
    """AES-GCM aad of a snapshot: binds the instance, the head it was taken at and the key."""
    return (
        _SNAPSHOT
        + _str16(instance_id)
        + _u(head_sequence, 8)
        + _hash32(head_hash, "head hash")
        + _u(key_version, 4)
    )


def response_aad(instance_id: str, request_id: str) -> bytes:
    """AES-GCM aad of a sealed response: the host cannot swap responses between requests."""
    return _RESPONSE + _str16(instance_id) + _str16(request_id)


def vote_commitment(ballot_id: str, voter: str, option: int, salt: bytes) -> bytes:
    """A vote's commitment: hides the option behind the voter's salt, binds voter and ballot."""
    encoded = _BALLOT_VOTE + _str16(ballot_id) + _str16(voter) + _u(option, 4) + _prefixed(salt, 2)
    return hashlib.sha256(encoded).digest()
