"""Key-encryption keys (KEKs): the root of the keyvault's envelope encryption.

Data keys and token-signing keys are stored only wrapped under a KEK. Two providers share
one small interface (:class:`Kek`: ``wrap(plaintext, aad)`` / ``unwrap(blob, aad)``) and
one versioned blob format:

    offset  size  field
    0       1     format version, 0x01
    1       1     L = length of the key id
    2       L     key id (UTF-8), e.g. ``file-1a2b3c4d5e6f7a8b`` or ``pkcs11-veil-kek``
    2+L     12    AES-GCM nonce (random)
    14+L    n+16  AES-256-GCM ciphertext and 16-byte tag

The GCM additional data is ``blob[0 : 2+L] || aad``: the header (self-delimiting through
its length byte) is authenticated, so a blob cannot be re-labelled, and the caller's AAD
binds the blob to its context (for data keys: key name and version). Every unwrap failure
-- malformed blob, other key id, flipped bit, wrong AAD -- raises the same opaque
:class:`~veil.services.keyvault.errors.DecryptionError`.

* :class:`FileKek` (development): a 32-byte key file, created with mode 0600 when missing
  and refused when group- or world-accessible or a symlink; AES-256-GCM in process. A
  Kubernetes Secret cannot be mounted that way (its files are symlinks into ``..data`` and
  group-readable for the pod's fsGroup), so the sim overlay copies it first with
  ``python -m veil.services.keyvault.kek SECRET_FILE TARGET`` (:func:`install_key_file`, in an
  init container) into a memory ``emptyDir``: a regular 0600 file the check accepts as it is.
* :class:`Pkcs11Kek` (production): an AES-256 key inside a PKCS#11 token (HSM), found by
  label and created there when missing with ``CKA_SENSITIVE=true``,
  ``CKA_EXTRACTABLE=false``; AES-GCM runs inside the token, so the KEK never enters
  process memory. One session per instance, serialised by a lock (PKCS#11 sessions must
  not be used by two threads at once).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pkcs11
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11err
from pkcs11.types import DecryptMixin, EncryptMixin

from veil.services.keyvault.errors import DecryptionError, KekError

FORMAT_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32

#: A source of random bytes; injectable so known-answer tests can fix the nonce.
NonceSource = Callable[[int], bytes]


class Kek(Protocol):
    """A key-encryption key: authenticated wrap and unwrap bound to caller AAD."""

    @property
    def provider(self) -> str:
        """``"file"`` or ``"pkcs11"`` (reported by GetStatus)."""
        ...

    @property
    def key_id(self) -> str:
        """The id written into every blob this KEK produces."""
        ...

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt ``plaintext`` bound to ``aad``; returns a versioned blob."""
        ...

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob made by :meth:`wrap` with the same ``aad``, or raise DecryptionError."""
        ...

    def close(self) -> None:
        """Release provider resources (HSM sessions)."""
        ...


def blob_key_id(blob: bytes) -> str | None:
    """The key id a blob names, for diagnostics only (unauthenticated until unwrapped)."""
    try:
        return _parse(blob)[1]
    except DecryptionError:
        return None


def _header(key_id: str) -> bytes:
    raw = key_id.encode("utf-8")
    if not 0 < len(raw) <= 255:
        raise KekError("KEK key id must be 1..255 bytes of UTF-8")
    return bytes([FORMAT_VERSION, len(raw)]) + raw


def _parse(blob: bytes) -> tuple[bytes, str, bytes, bytes]:
    """Split a blob into (header, key id, nonce, ciphertext||tag); DecryptionError if malformed."""
    if len(blob) < 2 or blob[0] != FORMAT_VERSION:
        raise DecryptionError
    end = 2 + blob[1]
    if blob[1] == 0 or len(blob) < end + NONCE_SIZE + TAG_SIZE:
        raise DecryptionError
    try:
        key_id = blob[2:end].decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionError from None
    return blob[:end], key_id, blob[end : end + NONCE_SIZE], blob[end + NONCE_SIZE :]


class _GcmKek:
    """The blob format over an AES-256-GCM primitive supplied by the subclass."""

    provider = "abstract"

    def __init__(self, key_id: str, nonce_source: NonceSource) -> None:
        self._key_id = key_id
        self._header = _header(key_id)
        self._nonce_source = nonce_source

    @property
    def key_id(self) -> str:
        return self._key_id

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = self._nonce_source(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise KekError("nonce source returned the wrong length")
        sealed = self._seal(nonce, plaintext, self._header + aad)
        return self._header + nonce + sealed

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        header, key_id, nonce, sealed = _parse(blob)
        if key_id != self._key_id:
            raise DecryptionError
        return self._open(nonce, sealed, header + aad)

    def close(self) -> None:
        """Nothing to release by default."""

    def _seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def _open(self, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        raise NotImplementedError


class FileKek(_GcmKek):
    """A KEK in a local 32-byte key file (development and tests)."""

    provider = "file"

    def __init__(self, path: Path, *, create: bool = True, nonce_source: NonceSource = os.urandom) -> None:
        key = _load_or_create_key_file(path, create=create)
        # The id names the key without revealing it: a truncated hash under a fixed label.
        digest = hashlib.sha256(b"veil/kek-id/v1" + key).digest()
        super().__init__(f"file-{digest[:8].hex()}", nonce_source)
        self._aead = AESGCM(key)

    def _seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def _open(self, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise DecryptionError from None


def _load_or_create_key_file(path: Path, *, create: bool) -> bytes:
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # O_EXCL: two replicas racing to create the file cannot both write a key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, os.urandom(KEY_SIZE))
                os.fsync(fd)
            finally:
                os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KekError(f"KEK file {path} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KekError(f"KEK file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KekError(f"KEK file {path} is accessible by group or others; chmod 600 it")
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise KekError(f"KEK file {path} must hold exactly {KEY_SIZE} bytes")
    return key


class Pkcs11Kek(_GcmKek):
    """A KEK held by a PKCS#11 token; wrap and unwrap run inside the token."""

    provider = "pkcs11"

    def __init__(
        self,
        module: str,
        *,
        token_label: str,
        pin: str,
        key_label: str,
        create: bool = True,
        nonce_source: NonceSource = os.urandom,
    ) -> None:
        super().__init__(f"pkcs11-{key_label}", nonce_source)
        self._lock = threading.Lock()
        try:
            token = pkcs11.lib(module).get_token(token_label=token_label)
        except p11err.PKCS11Error as exc:
            raise KekError(f"PKCS#11 token {token_label!r} not available: {type(exc).__name__}") from None
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except p11err.UserAlreadyLoggedIn:
            # Login state is per application: another session of this process logged in already.
            self._session = token.open(rw=True)
        except p11err.PKCS11Error as exc:
            raise KekError(f"PKCS#11 login to {token_label!r} failed: {type(exc).__name__}") from None
        try:
            key = self._find_or_create(key_label, create=create)
        except BaseException:
            self._session.close()
            raise
        if not (isinstance(key, EncryptMixin) and isinstance(key, DecryptMixin)):
            self._session.close()
            raise KekError(f"AES key {key_label!r} cannot both encrypt and decrypt")
        self._encryptor: EncryptMixin = key
        self._decryptor: DecryptMixin = key

    def _find_or_create(self, label: str, *, create: bool) -> pkcs11.SecretKey:
        try:
            key = self._session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=label
            )
        except p11err.MultipleObjectsReturned:
            raise KekError(f"more than one AES key labelled {label!r} in the token") from None
        except p11err.NoSuchKey:
            if not create:
                raise KekError(f"no AES key labelled {label!r} in the token") from None
            key = self._session.generate_key(
                KeyType.AES,
                KEY_SIZE * 8,
                label=label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                },
            )
        if not isinstance(key, pkcs11.SecretKey):
            raise KekError(f"object labelled {label!r} is not a secret key")
        # Fail closed on a pre-existing key that could leave the HSM or is the wrong size.
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            raise KekError(f"AES key {label!r} is extractable or not sensitive; refusing to use it")
        if key[Attribute.VALUE_LEN] != KEY_SIZE:
            raise KekError(f"AES key {label!r} is not 256 bits")
        return key

    def _in_token(self, operation: Callable[..., object], data: bytes, nonce: bytes, aad: bytes) -> object:
        """Run one AES-GCM ``operation`` in the token (a PKCS#11 session takes one thread at a time)."""
        with self._lock:
            return operation(
                data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, TAG_SIZE * 8)
            )

    def _seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        try:
            out = self._in_token(self._encryptor.encrypt, plaintext, nonce, aad)
        except p11err.PKCS11Error as exc:
            raise KekError(f"PKCS#11 wrap failed: {type(exc).__name__}") from None
        if not isinstance(out, bytes):  # the one-shot call returns bytes; streams are not used
            raise KekError("PKCS#11 wrap returned a stream")
        return out

    def _open(self, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            out = self._in_token(self._decryptor.decrypt, sealed, nonce, aad)
        except p11err.PKCS11Error:
            # Tokens report a bad tag variously (GeneralError, EncryptedDataInvalid, ...).
            raise DecryptionError from None
        if not isinstance(out, bytes):
            raise DecryptionError
        return out

    def close(self) -> None:
        with self._lock:
            self._session.close()


def install_key_file(source: Path, target: Path) -> None:
    """Copy a mounted key (a Secret's symlinked, group-readable file) to ``target``, 0600, new.

    ``source`` is read through the kubelet's symlinks: the Secret volume is the kubelet's, not
    an attacker's. ``target`` must not exist (``O_EXCL | O_NOFOLLOW``): nothing is overwritten
    and no link is followed where the key is written.
    """
    key = source.read_bytes()
    if len(key) != KEY_SIZE:
        raise KekError(f"KEK file {source} must hold exactly {KEY_SIZE} bytes")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise KekError(f"KEK file {target} cannot be created: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """``python -m veil.services.keyvault.kek SOURCE TARGET``: :func:`install_key_file`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m veil.services.keyvault.kek SOURCE TARGET", file=sys.stderr)
        return 2
    try:
        install_key_file(Path(args[0]), Path(args[1]))
    except (OSError, KekError) as exc:
        print(f"kek: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
