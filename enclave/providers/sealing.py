"""Sealing with a platform-derived key, and the `sim` sealing provider.

Blob format: version byte 0x01 || nonce (12) || AES-256-GCM ciphertext; the AAD is the version
byte followed by the caller's AAD. The `sim` key is
HKDF-SHA256(ikm = platform secret, salt = none, info = "veil/seal/v1" || MRENCLAVE): a blob
sealed on one simulated node (platform secret) by one enclave build (measurement) opens on
no other.
"""

from __future__ import annotations

from veil.enclave import crypto
from veil.enclave.errors import DecryptionError

_VERSION = b"\x01"
SEAL_INFO = b"veil/seal/v1"


class KeySealer:
    """AES-256-GCM sealing under one derived key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal `plaintext` under the platform key."""
        return _VERSION + crypto.seal_blob(self._key, plaintext, _VERSION + aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """Open a sealed blob, or raise DecryptionError."""
        if blob[:1] != _VERSION:
            raise DecryptionError
        return crypto.open_blob(self._key, blob[1:], _VERSION + aad)


class SimSealingProvider(KeySealer):
    """Sealing bound to a simulated platform (its secret) and the enclave measurement."""

    def __init__(self, platform_secret: bytes, mrenclave: bytes) -> None:
        if len(platform_secret) < 32:
            raise ValueError("platform secret must be at least 32 bytes")
        super().__init__(crypto.hkdf_sha256(platform_secret, SEAL_INFO + mrenclave))
