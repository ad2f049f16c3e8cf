"""What the keyvault signs for an enclave, made by whoever holds a release-signing key.

An enclave accepts data keys and head statements only from the keyvault whose release key it
pinned at Initialize. The enclave tests and the state memory bench (`veil.dev.state_memory`)
drive an enclave with no keyvault service: they pin a key of their own and sign with it here,
byte for byte as the keyvault does (`veil.services.keyvault`). Production never imports this.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2

X25519 = envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM


def wrap_key(
    keys: envelope_pb2.EnclavePublicKeys,
    instance_id: str,
    version: int,
    key: bytes,
    *,
    signer: ed25519.Ed25519PrivateKey | None,
) -> envelope_pb2.WrappedKey:
    """Wrap and sign a data key exactly as the keyvault does (`signer` None: unsigned)."""
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    public = x25519.X25519PublicKey.from_public_bytes(keys.hpke_x25519_public_key)
    key_name = wire.instance_key_name(instance_id)
    sealed = suite.encrypt(key, public, info=wire.key_release_info(key_name, version))
    wrapped = envelope_pb2.WrappedKey(suite=X25519, encapsulated_key=sealed[:32], ciphertext=sealed[32:])
    if signer is not None:
        wrapped.signature = release_signature(
            wrapped, key_name, version, keys.hpke_x25519_public_key, signer=signer
        )
    return wrapped


def release_signature(
    wrapped: envelope_pb2.WrappedKey,
    key_name: str,
    version: int,
    recipient_hpke_public_key: bytes,
    *,
    signer: ed25519.Ed25519PrivateKey,
) -> bytes:
    """A keyvault release signature over `wrapped` for any (name, version, recipient)."""
    message = wire.wrapped_key_signing_bytes(
        key_name, version, recipient_hpke_public_key, wrapped.encapsulated_key, wrapped.ciphertext
    )
    return signer.sign(message)


def head_statement(
    keys: envelope_pb2.EnclavePublicKeys,
    instance_id: str,
    challenge: bytes,
    head: envelope_pb2.CommitHead | None = None,
    *,
    genesis_hash: bytes = b"",
    config_hash: bytes = b"",
    not_after_unix_ms: int,
    signer: ed25519.Ed25519PrivateKey,
) -> envelope_pb2.HeadStatement:
    """The keyvault's GetCommitHead statement of `head` for the enclave of `keys` and `challenge`."""
    statement = envelope_pb2.HeadStatement(
        instance_id=instance_id,
        challenge=challenge,
        enclave_signing_public_key=keys.signing_public_key,
        head=head or envelope_pb2.CommitHead(),
        genesis_hash=genesis_hash,
        config_hash=config_hash,
        not_after_unix_ms=not_after_unix_ms,
    )
    statement.signature = signer.sign(wire.head_statement_bytes(statement))
    return statement
