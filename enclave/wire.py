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

Quoted by the enclave (the host supplies only the nonce, exactly 32 bytes):
    report data:  SHA-256("veil/report-data/v1" || bytes32(runtime_data) || bytes16(nonce))
                  || 32 zero bytes; runtime_data = the enclave's own EnclavePublicKeys
Signed by the keyvault's Ed25519 release key (pinned in the enclave at Initialize):
    wrapped key:  "veil/wrapped-key/v1" || str16(key_name) || u32(version)
                  || bytes16(recipient_hpke_public_key) || bytes16(encapsulated_key)
                  || bytes32(ciphertext)
    head statement: "veil/head-statement/v1" || str16(instance_id) || bytes16(challenge)
                  || bytes16(enclave_signing_public_key) || u64(sequence) || bytes16(hash)
                  || bytes16(genesis_hash) || bytes16(config_hash) || u64(not_after_unix_ms)
                  (GetCommitHead for one enclave challenge; sequence 0 = no such instance)
    head confirmation: "veil/head-confirmation/v1" || str16(instance_id) || u64(sequence)
                  || hash(32) || bytes16(enclave_signing_public_key)
                  (AdvanceCommitHead's answer, to the boot whose links got there)
Signed by the enclave's Ed25519 key:
    commit link:  "veil/commit-link/v1" || str16(instance_id) || genesis_hash(32)
                  || config_hash(32) || u64(base_sequence) || base_hash(32) || u64(sequence)
                  || hash(32)   (base 0 with 32 zero bytes registers the instance)
    instance descriptor: "veil/instance/v1" || str16(instance_id) || config_hash(32)
                  || genesis_hash(32);   config_hash = SHA-256(serialized InstanceConfig)
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
    held answer:  "veil/held-response/v1" || str16(instance_id) || u64(held_until)
    held read:    "veil/held-read/v1" || str16(instance_id) || u64(read_round)
Derived by the enclave and by the keyvault, which both hold the instance's data key:
    hold root:    HKDF-SHA256(ikm = a data key version, no salt, length 32, info = "veil/hold-root/v1")
    hold key:     HKDF-SHA256(ikm = hold root, no salt, length 32, info = "veil/hold-key/v1"
                  || str16(instance_id) || u64(sequence) || hash(32)
                  || bytes16(enclave_signing_public_key)): opens the answers held until head
                  (sequence, hash) of that boot; the keyvault gives it out once it holds the head
    hold key check: SHA-256("veil/hold-key-check/v1" || hold key), so the host can tell it
    sealed keys:  "veil/sealed-keys/v2" || bytes16(keyvault_release_public_key)
Hashes (SHA-256):
    command hash: SHA-256(encapsulated_key || ciphertext) of the SealedCommand
                  (the encapsulated key has a fixed length per suite, so this is unambiguous)
    entry hash:   SHA-256("veil/log-entry-hash/v1" || str16(instance_id) || u64(sequence)
                  || u32(key_version) || previous_hash(32) || bytes16(nonce) || bytes32(ciphertext))
    result hash:  SHA-256(CommandResponse.result)
    ballot vote:  SHA-256("veil/ballot-vote/v1" || str16(ballot_id) || str16(voter) || u32(option)
                  || bytes16(salt))   (the tally's Merkle leaves; see veil.enclave.apps.merkle)
JSON that a signature or a pin covers (JWT parts, collateral, release policies) has one reading:
    strict_json_object refuses duplicate members and NaN/Infinity, and wants an object.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.enclave import crypto
from veil.enclave.v1 import command_pb2, envelope_pb2

COMMAND_INFO = b"veil/command/v1"
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)

_KEY_RELEASE = b"veil/key-release/v1"
_WRAPPED_KEY = b"veil/wrapped-key/v1"
REPORT_NONCE_SIZE = 32
REPORT_DATA_SIZE = 64

_REPORT_DATA = b"veil/report-data/v1"
_SEALED_KEYS = b"veil/sealed-keys/v2"  # v2: binds the pinned keyvault release key
_HEAD_STATEMENT = b"veil/head-statement/v1"
_HEAD_CONFIRMATION = b"veil/head-confirmation/v1"
_COMMIT_LINK = b"veil/commit-link/v1"
_INSTANCE = b"veil/instance/v1"
_HELD_RESPONSE = b"veil/held-response/v1"
_HELD_READ = b"veil/held-read/v1"
_HOLD_ROOT = b"veil/hold-root/v1"
_HOLD_KEY = b"veil/hold-key/v1"
_HOLD_KEY_CHECK = b"veil/hold-key-check/v1"
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


def report_data(runtime_data: bytes, nonce: bytes) -> bytes:
    """The 64-byte report data of a quote: the enclave's keys and the verifier's nonce, nothing else.

    Only the enclave calls this to quote (GetQuote takes just the nonce); verifiers call it to
    check a quote. Domain-separated and length-prefixed, so no other Veil hash can collide.
    """
    if len(nonce) != REPORT_NONCE_SIZE:
        raise ValueError(f"nonce must be {REPORT_NONCE_SIZE} bytes")
    digest = hashlib.sha256(_REPORT_DATA + _prefixed(runtime_data, 4) + _prefixed(nonce, 2)).digest()
    return digest + bytes(REPORT_DATA_SIZE - HASH_SIZE)


def head_statement_bytes(statement: envelope_pb2.HeadStatement) -> bytes:
    """What the keyvault signs for GetCommitHead: the head, for one enclave boot and challenge.

    The enclave's signing key is fresh per Initialize and the challenge is single-use, so a
    statement can be used once, by the enclave that asked, shortly after the keyvault made it.
    """
    return (
        _HEAD_STATEMENT
        + _str16(statement.instance_id)
        + _prefixed(statement.challenge, 2)
        + _prefixed(statement.enclave_signing_public_key, 2)
        + _u(statement.head.sequence, 8)
        + _prefixed(statement.head.hash, 2)
        + _prefixed(statement.genesis_hash, 2)
        + _prefixed(statement.config_hash, 2)
        + _u(statement.not_after_unix_ms, 8)
    )


def head_confirmation_bytes(
    instance_id: str, sequence: int, head_hash: bytes, enclave_signing_public_key: bytes
) -> bytes:
    """What the keyvault signs when it holds head (sequence, hash), for the boot that got it there.

    Bound to that boot's key: an old confirmation cannot be replayed into another boot.
    """
    return (
        _HEAD_CONFIRMATION
        + _str16(instance_id)
        + _u(sequence, 8)
        + _hash32(head_hash, "head hash")
        + _prefixed(enclave_signing_public_key, 2)
    )


def commit_link_bytes(link: envelope_pb2.CommitLink) -> bytes:
    """What the enclave signs to move the keyvault's head from `link.base` to `link.head`."""
    return (
        _COMMIT_LINK
        + _str16(link.instance_id)
        + _hash32(link.genesis_hash, "genesis hash")
        + _hash32(link.config_hash, "config hash")
        + _u(link.base.sequence, 8)
        + _hash32(link.base.hash, "base hash")
        + _u(link.head.sequence, 8)
        + _hash32(link.head.hash, "head hash")
    )


def instance_descriptor_bytes(instance_id: str, config_hash: bytes, genesis_hash: bytes) -> bytes:
    """What the enclave signs to describe an instance: its id, configuration and genesis."""
    return (
        _INSTANCE
        + _str16(instance_id)
        + _hash32(config_hash, "config hash")
        + _hash32(genesis_hash, "genesis hash")
    )


def config_hash(config_bytes: bytes) -> bytes:
    """The hash naming an instance configuration: SHA-256 of its serialized bytes."""
    return hashlib.sha256(config_bytes).digest()


def hold_root(data_key: bytes) -> bytes:
    """What hold keys are derived from: one per data key version, so the keyvault can keep it at
    hand (never the data key) and the data key serves one derivation besides its AES-GCM use."""
    return crypto.hkdf_sha256(data_key, _HOLD_ROOT)


def hold_key(root: bytes, instance_id: str, sequence: int, head_hash: bytes, enclave_key: bytes) -> bytes:
    """The key of the answers held until head (sequence, head_hash) of the boot signing with
    `enclave_key`. The keyvault derives it too and gives it to the host once it holds that head:
    a release without an ECALL, and only on the keyvault's word (the host has no data key)."""
    info = _HOLD_KEY + _str16(instance_id) + _u(sequence, 8) + _hash32(head_hash, "head hash")
    info += _prefixed(enclave_key, 2)
    return crypto.hkdf_sha256(root, info)


def hold_key_check(key: bytes) -> bytes:
    """What the host compares a hold key from the keyvault with before it opens anything with it."""
    return hashlib.sha256(_HOLD_KEY_CHECK + key).digest()


def held_response_aad(instance_id: str, held_until: int) -> bytes:
    """AES-GCM aad of an answer held until the keyvault confirms head `held_until`."""
    return _HELD_RESPONSE + _str16(instance_id) + _u(held_until, 8)


def held_read_aad(instance_id: str, read_round: int) -> bytes:
    """AES-GCM aad of a query answer held until the read fence of round `read_round`."""
    return _HELD_READ + _str16(instance_id) + _u(read_round, 8)


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


def command_proof_bytes(command: command_pb2.Command) -> bytes:
    """`command_signing_bytes` of a Command: what its signature proof covers (client and enclave)."""
    return command_signing_bytes(
        instance_id=command.instance_id,
        counter=command.counter,
        request_id=command.request_id,
        response_key=command.response_key,
        call=command.call,
    )


def receipt_signing_bytes(receipt: envelope_pb2.Receipt) -> bytes:
    """What the enclave signs for a receipt: its kind, instance, sequence, command and result
    (everything but the signature)."""
    return (
        _RECEIPT
        + _u(receipt.kind, 1)
        + _str16(receipt.instance_id)
        + _u(receipt.sequence, 8)
        + _hash32(receipt.command_hash, "command hash")
        + _hash32(receipt.result_hash, "result hash")
    )


def verify_ed25519(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` by the raw Ed25519 `public_key` verifies over `message`."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (ValueError, InvalidSignature):
        return False
    return True


def verify_receipt(receipt: envelope_pb2.Receipt, signing_public_key: bytes) -> bool:
    """True when `receipt` carries a valid enclave signature (for the SDK and tests)."""
    try:
        message = receipt_signing_bytes(receipt)
    except (ValueError, OverflowError):
        return False
    return verify_ed25519(signing_public_key, receipt.signature, message)


def verify_commit_link(link: envelope_pb2.CommitLink, signing_public_key: bytes) -> bool:
    """True when `link` is well formed, moves forward and carries a valid enclave signature."""
    try:
        message = commit_link_bytes(link)
    except (ValueError, OverflowError):
        return False
    if link.head.sequence <= link.base.sequence:
        return False
    return verify_ed25519(signing_public_key, link.signature, message)


def verify_instance_descriptor(
    descriptor: envelope_pb2.InstanceDescriptor, signing_public_key: bytes
) -> bool:
    """True when `descriptor` carries a valid enclave signature over its id, config and genesis."""
    try:
        message = instance_descriptor_bytes(
            descriptor.instance_id, config_hash(descriptor.config), descriptor.genesis_hash
        )
    except (ValueError, OverflowError):
        return False
    return verify_ed25519(signing_public_key, descriptor.signature, message)


_PLACE = struct.Struct(">QI")  # sequence, key version: restore encodes them for every entry
_AEAD_NONCED = struct.Struct(">H12sI")  # nonce length, AES-GCM's 12-byte nonce, ciphertext length


def entry_place(sequence: int, key_version: int, previous_hash: bytes) -> bytes:
    """A log entry's place in its chain, as its aad and its hash both encode it."""
    try:
        numbers = _PLACE.pack(sequence, key_version)
    except struct.error:
        raise OverflowError("sequence or key version out of range") from None
    return numbers + _hash32(previous_hash, "previous hash")


class EntryChain:
    """The AES-GCM aad and the chain hash of one instance's log entries, its name encoded once
    (restore computes both for every entry of a log, from one `entry_place`)."""

    def __init__(self, instance_id: str) -> None:
        name = _str16(instance_id)
        self._aad_prefix = _LOG_ENTRY + name
        self._hash_prefix = _LOG_ENTRY_HASH + name

    def aad(self, place: bytes) -> bytes:
        """AES-GCM aad of a log entry: binds its place in the hash chain and its key version."""
        return self._aad_prefix + place

    def hash(self, place: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
        """The hash chaining a log entry to the next one (and naming the commit head)."""
        if len(nonce) == 12 and len(ciphertext) < 2**32:  # every entry's: packed at once
            sizes = _AEAD_NONCED.pack(12, nonce, len(ciphertext))
        else:
            sizes = _prefixed(nonce, 2) + _u(len(ciphertext), 4)  # OverflowError if they do not fit
        digest = hashlib.sha256(self._hash_prefix + place + sizes)
        digest.update(ciphertext)  # hashed in place: the ciphertext is most of the entry
        return digest.digest()


def entry_aad(instance_id: str, sequence: int, key_version: int, previous_hash: bytes) -> bytes:
    """AES-GCM aad of a log entry: binds its place in the hash chain and its key version."""
    return EntryChain(instance_id).aad(entry_place(sequence, key_version, previous_hash))


def entry_hash(entry: envelope_pb2.LogEntry) -> bytes:
    """The hash chaining a log entry to the next one (and naming the commit head)."""
    place = entry_place(entry.sequence, entry.key_version, entry.previous_hash)
    return EntryChain(entry.instance_id).hash(place, entry.nonce, entry.ciphertext)


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


class _JsonRefused(Exception):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JsonRefused(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise _JsonRefused(f"{name} is not allowed")  # NaN/Infinity would defeat every comparison


def strict_json_object(data: bytes | str, what: str, error: Callable[[str], Exception]) -> dict[str, Any]:
    """Parse a JSON object with one reading; anything else raises `error("<what>: <why>")`."""
    try:
        value = json.loads(data, object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except _JsonRefused as exc:
        raise error(f"{what}: {exc}") from None
    except (ValueError, RecursionError):  # bad UTF-8 too; deep nesting must not escape as a bug
        raise error(f"{what}: not valid JSON") from None
    if not isinstance(value, dict):
        raise error(f"{what}: expected a JSON object")
    return value
