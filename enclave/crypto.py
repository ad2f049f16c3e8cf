"""The enclave's cryptographic primitives: AES-256-GCM, HPKE and its key pairs.

Every decryption failure, whatever its cause (wrong key, flipped bit, wrong AAD, bad length,
unknown suite), raises the same `DecryptionError`.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as _rust_openssl
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import envelope_pb2

KEY_SIZE = 32
NONCE_SIZE = 12
MLKEM768_PUBLIC_KEY_SIZE = 1184

X25519_SUITE = envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM
MLKEM768X25519_SUITE = envelope_pb2.HPKE_SUITE_MLKEM768X25519_SHA256_AES128GCM

_SUITES: dict[int, hpke.Suite] = {
    X25519_SUITE: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM),
    MLKEM768X25519_SUITE: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM),
}

# cryptography's public single-shot HPKE API takes `info` only; RFC 9180 aad is exposed by
# these two functions of the same binding (cryptography is pinned exactly in pyproject.toml,
# and tests/enclave/test_crypto.py checks them against the RFC 9180 test vector).
_encrypt_with_aad = _rust_openssl.hpke._encrypt_with_aad
_decrypt_with_aad = _rust_openssl.hpke._decrypt_with_aad


# --- HKDF -----------------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """A 32-byte key from `ikm` under `info` (HKDF-SHA256, no salt): sealing keys, hold roots
    and hold keys."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(ikm)


# --- AES-256-GCM --------------------------------------------------------------------------


def aead_seal(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """Encrypt under a fresh random nonce; returns (nonce, ciphertext)."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Decrypt and authenticate, or raise DecryptionError."""
    return AeadKey(key).open(nonce, ciphertext, aad)


class AeadKey:
    """AES-256-GCM set up once for many messages under one key (restore opens a whole log)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise DecryptionError
        self._aead = AESGCM(key)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Decrypt and authenticate, or raise DecryptionError."""
        if len(nonce) != NONCE_SIZE:
            raise DecryptionError
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError from None


def seal_blob(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM as one blob: nonce (12 bytes) || ciphertext."""
    nonce, ciphertext = aead_seal(key, plaintext, aad)
    return nonce + ciphertext


def open_blob(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Open a `seal_blob` blob, or raise DecryptionError."""
    return aead_open(key, blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)


# --- HPKE ---------------------------------------------------------------------------------

HpkePublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey


def hpke_public_key(suite: int, public_bytes: bytes) -> HpkePublicKey:
    """Load an enclave HPKE public key as published in EnclavePublicKeys.

    The ML-KEM-768+X25519 key is published as ML-KEM-768 public key (1184 bytes) || X25519 (32).
    """
    if suite == X25519_SUITE:
        return x25519.X25519PublicKey.from_public_bytes(public_bytes)
    if suite == MLKEM768X25519_SUITE:
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes[:MLKEM768_PUBLIC_KEY_SIZE]),
            x25519.X25519PublicKey.from_public_bytes(public_bytes[MLKEM768_PUBLIC_KEY_SIZE:]),
        )
    raise ValueError("unsupported HPKE suite")


def hpke_seal(
    suite: int, public_bytes: bytes, plaintext: bytes, info: bytes, aad: bytes
) -> tuple[bytes, bytes]:
    """Seal to an enclave HPKE key (sender side: SDK, keyvault, tests); returns (enc, ciphertext)."""
    sealed: bytes = _encrypt_with_aad(
        _SUITES[suite], plaintext, hpke_public_key(suite, public_bytes), info=info, aad=aad
    )
    enc_length = _enc_length(suite)
    return sealed[:enc_length], sealed[enc_length:]


def _enc_length(suite: int) -> int:
    kem = hpke.KEM.X25519 if suite == X25519_SUITE else hpke.KEM.MLKEM768_X25519
    return kem.enc_length()


class HpkeKeyPairs:
    """The enclave's HPKE private keys: X25519 (default suite) and ML-KEM-768+X25519."""

    def __init__(self) -> None:
        self._x25519 = x25519.X25519PrivateKey.generate()
        mlkem_key = mlkem.MLKEM768PrivateKey.generate()
        pq_x25519 = x25519.X25519PrivateKey.generate()
        self._hybrid = hpke.MLKEM768X25519PrivateKey(mlkem_key, pq_x25519)
        self.x25519_public = self._x25519.public_key().public_bytes_raw()
        self.hybrid_public = (
            mlkem_key.public_key().public_bytes_raw() + pq_x25519.public_key().public_bytes_raw()
        )

    def open(self, suite: int, enc: bytes, ciphertext: bytes, info: bytes, aad: bytes) -> bytes:
        """Open a sealed message, or raise DecryptionError."""
        if suite not in _SUITES or len(enc) != _enc_length(suite):
            raise DecryptionError
        key = self._x25519 if suite == X25519_SUITE else self._hybrid
        try:
            plaintext: bytes = _decrypt_with_aad(_SUITES[suite], enc + ciphertext, key, info=info, aad=aad)
        except (InvalidTag, ValueError):
            raise DecryptionError from None
        return plaintext
