"""The keyvault's release-signing key: an Ed25519 key that signs every released data key.

HPKE base mode does not authenticate the sender, and an enclave's HPKE key is public, so
without a signature an enclave cannot tell a key released by the keyvault from one the
host wrapped itself. Enclaves pin this key's public half at Initialize (the state host
takes it from ``GetJwks.release_public_key``) and echo it in their runtime data, so quotes
and attestation tokens bind it; Attest refuses enclaves that pin any other key, and
ReleaseKey signs ``veil.enclave.wire.wrapped_key_signing_bytes`` with it.

There is exactly one release key per keyvault deployment, created by the first replica
that starts on an empty store and never rotated (rotating it would strand every running
enclave pinned to it). It lives in the store with its private half wrapped under the KEK::

    release_key_aad(public_key) = b"veil/release-signing-key/v1" || public_key (32 bytes)

so a wrapped blob cannot be paired with another public key. Creation is race-free across
replicas: ``insert_release_key`` is insert-if-absent on a single row, and whoever loses
the race reads and uses the winner's key. The creation is audited. The loaded key is attached
to the audit log, which signs every tip with it (see :mod:`veil.services.keyvault.audit`):
load it before anything else is audited.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.services.keyvault.audit import ACTION_CREATE_RELEASE_KEY, OUTCOME_ALLOWED, AuditLog
from veil.services.keyvault.clock import Clock, to_micros
from veil.services.keyvault.errors import DecryptionError, StoreError
from veil.services.keyvault.kek import Kek
from veil.services.keyvault.store import ReleaseKeyRecord, Store

RELEASE_KEY_AAD_LABEL = b"veil/release-signing-key/v1"
ED25519_KEY_SIZE = 32


def release_key_aad(public_key: bytes) -> bytes:
    """The KEK AAD of the wrapped release key: binds it to its published public half."""
    return RELEASE_KEY_AAD_LABEL + public_key


@dataclass(frozen=True)
class ReleaseSigner:
    """Signs released keys with the deployment's one Ed25519 release key."""

    private_key: Ed25519PrivateKey
    public_key: bytes

    def sign(self, message: bytes) -> bytes:
        """An Ed25519 signature over ``message`` (the wrapped-key signing bytes)."""
        return self.private_key.sign(message)


def load_or_create_release_signer(
    store: Store, kek: Kek, audit: AuditLog, clock: Clock, *, caller: str = "system"
) -> ReleaseSigner:
    """The stored release key, created (once, race-free, audited) when the store has none; attached
    to ``audit`` as its tip signer."""
    with store.transaction() as tx:
        record = tx.get_release_key()
        if record is None:
            private_key = Ed25519PrivateKey.generate()
            public_key = private_key.public_key().public_bytes_raw()
            candidate = ReleaseKeyRecord(
                public_key=public_key,
                kek_id=kek.key_id,
                wrapped_private=kek.wrap(private_key.private_bytes_raw(), release_key_aad(public_key)),
                created_us=to_micros(clock()),
            )
            if tx.insert_release_key(candidate):
                signer = ReleaseSigner(private_key=private_key, public_key=public_key)
                audit.attach_signer(signer)  # its own creation is the first signed audit tip
                audit.append(
                    tx,
                    action=ACTION_CREATE_RELEASE_KEY,
                    outcome=OUTCOME_ALLOWED,
                    caller=caller,
                    detail={"release_public_key": public_key.hex(), "kek_id": kek.key_id},
                )
                return signer
            record = tx.get_release_key()  # another replica created it first: use theirs
    if record is None:
        raise StoreError("the release-signing key vanished while it was being created")
    signer = _unwrap(record, kek)
    audit.attach_signer(signer)
    return signer


def _unwrap(record: ReleaseKeyRecord, kek: Kek) -> ReleaseSigner:
    if len(record.public_key) != ED25519_KEY_SIZE:
        raise StoreError("the stored release-signing public key is not 32 bytes")
    try:
        raw = kek.unwrap(record.wrapped_private, release_key_aad(record.public_key))
    except DecryptionError:
        raise StoreError("the release-signing key does not unwrap under the configured KEK") from None
    try:
        private_key = Ed25519PrivateKey.from_private_bytes(raw)
    except ValueError:
        raise StoreError("the stored release-signing key is not an Ed25519 key") from None
    if private_key.public_key().public_bytes_raw() != record.public_key:
        raise StoreError("the stored release-signing key does not match its public key")
    return ReleaseSigner(private_key=private_key, public_key=record.public_key)
