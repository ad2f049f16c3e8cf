"""The enclave's public keys as carried in an attestation token's runtime data (``x-ms-sgx-ehd``).

Runtime data is a serialized ``veil.enclave.v1.EnclavePublicKeys``: the X25519 HPKE key
that receives released data keys, the Ed25519 key that signs commit heads, and the
keyvault release-signing key the enclave pinned at Initialize (the only keyvault whose
releases it accepts). All three are required. Only the canonical serialization is
accepted (re-serializing the known fields must give the same bytes), so the keyvault and
the enclave can never read one blob two ways (duplicate, reordered or unknown fields).
Keys are only trusted through :func:`bound_enclave_keys`, which first re-checks that the
token's report data is SHA-256(runtime data || nonce) with 32 zero bytes after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from google.protobuf.message import DecodeError

from veil.enclave.v1 import envelope_pb2
from veil.services.keyvault.errors import AttestationRefusedError
from veil.verify import binding
from veil.verify.errors import BindingError
from veil.verify.tokens import VerifiedToken

X25519_KEY_SIZE = 32
ED25519_KEY_SIZE = 32


@dataclass(frozen=True)
class EnclaveKeys:
    """An attested enclave's public keys, parsed and size-checked."""

    hpke_public_key: X25519PublicKey
    signing_public_key: Ed25519PublicKey
    hpke_public_bytes: bytes
    signing_public_bytes: bytes
    keyvault_release_public_bytes: bytes


def parse_runtime_data(runtime_data: bytes) -> EnclaveKeys:
    """Parse ``EnclavePublicKeys``; raise :class:`AttestationRefusedError` unless canonical and complete."""
    message = envelope_pb2.EnclavePublicKeys()
    try:
        message.ParseFromString(runtime_data)
    except DecodeError:
        raise AttestationRefusedError(
            "runtime data is not EnclavePublicKeys", reason="RUNTIME_DATA_INVALID"
        ) from None
    message.DiscardUnknownFields()  # protobuf re-serializes unknown fields; make them count
    if message.SerializeToString(deterministic=True) != runtime_data:
        raise AttestationRefusedError(
            "runtime data is not canonically serialized", reason="RUNTIME_DATA_INVALID"
        )
    if len(message.hpke_x25519_public_key) != X25519_KEY_SIZE:
        raise AttestationRefusedError(
            "runtime data lacks a 32-byte X25519 HPKE key", reason="RUNTIME_DATA_INVALID"
        )
    if len(message.signing_public_key) != ED25519_KEY_SIZE:
        raise AttestationRefusedError(
            "runtime data lacks a 32-byte Ed25519 signing key", reason="RUNTIME_DATA_INVALID"
        )
    if len(message.keyvault_release_public_key) != ED25519_KEY_SIZE:
        raise AttestationRefusedError(
            "runtime data lacks a 32-byte keyvault release key", reason="RUNTIME_DATA_INVALID"
        )
    try:
        hpke_key = X25519PublicKey.from_public_bytes(message.hpke_x25519_public_key)
        signing_key = Ed25519PublicKey.from_public_bytes(message.signing_public_key)
    except ValueError:
        raise AttestationRefusedError(
            "runtime data holds an invalid public key", reason="RUNTIME_DATA_INVALID"
        ) from None
    return EnclaveKeys(
        hpke_public_key=hpke_key,
        signing_public_key=signing_key,
        hpke_public_bytes=bytes(message.hpke_x25519_public_key),
        signing_public_bytes=bytes(message.signing_public_key),
        keyvault_release_public_bytes=bytes(message.keyvault_release_public_key),
    )


def check_report_data(report_data: bytes, runtime_data: bytes, nonce: bytes) -> None:
    """:func:`veil.verify.binding.check_report_data`, refused as :class:`AttestationRefusedError`."""
    try:
        binding.check_report_data(report_data, runtime_data, nonce)
    except BindingError as exc:
        raise AttestationRefusedError(exc.reason) from None


def bound_enclave_keys(token: VerifiedToken) -> EnclaveKeys:
    """The enclave keys of a verified token, after re-checking the report-data binding."""
    check_report_data(token.report_data, token.runtime_data, token.nonce)
    return parse_runtime_data(token.runtime_data)
