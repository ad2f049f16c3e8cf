"""File KEK: known answer for the versioned blob format, tamper detection, key-file hygiene."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from veil.services.keyvault.errors import DecryptionError, KekError
from veil.services.keyvault.kek import FileKek, blob_key_id

KAT_KEY = bytes(range(32))
KAT_NONCE = bytes.fromhex("000102030405060708090a0b")
KAT_PLAINTEXT = b"veil known-answer plaintext 32B!"
KAT_AAD = b"aad"
KAT_KEY_ID = "file-25a2c97077d2e84f"
# 0x01 || len(kid) || kid || nonce || AES-256-GCM(key, nonce, pt, header || aad)
KAT_BLOB = bytes.fromhex(
    "011566696c652d32356132633937303737643265383466"
    "000102030405060708090a0b"
    "3167bf77e58eac74fa2fbaeadf9a0f08f1f6f758911231085d1f91a52e5b4293"
    "3861219cf6c183bc1a1d7db23f1cd740"
)


def kat_kek(tmp_path: Path) -> FileKek:
    path = tmp_path / "kat.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, KAT_KEY)
    os.close(fd)
    return FileKek(path, create=False, nonce_source=lambda size: KAT_NONCE[:size])


def test_known_answer(tmp_path: Path) -> None:
    kek = kat_kek(tmp_path)
    assert kek.key_id == KAT_KEY_ID
    assert kek.wrap(KAT_PLAINTEXT, KAT_AAD) == KAT_BLOB
    assert kek.unwrap(KAT_BLOB, KAT_AAD) == KAT_PLAINTEXT
    assert blob_key_id(KAT_BLOB) == KAT_KEY_ID


def test_every_flipped_bit_is_refused_with_one_opaque_error(tmp_path: Path) -> None:
    kek = kat_kek(tmp_path)
    for index in range(len(KAT_BLOB)):
        for bit in (0x01, 0x80):
            tampered = bytearray(KAT_BLOB)
            tampered[index] ^= bit
            with pytest.raises(DecryptionError) as caught:
                kek.unwrap(bytes(tampered), KAT_AAD)
            assert str(caught.value) == "decryption failed"


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        KAT_BLOB[:-1],
        KAT_BLOB[:30],
        b"\x02" + KAT_BLOB[1:],
        KAT_BLOB + b"\x00",
        b"\x01\x00" + b"\x00" * 40,
    ],
)
def test_malformed_blobs_are_refused(tmp_path: Path, blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        kat_kek(tmp_path).unwrap(blob, KAT_AAD)


def test_wrong_aad_and_wrong_key_are_refused(tmp_path: Path) -> None:
    kek = FileKek(tmp_path / "a.key")
    other = FileKek(tmp_path / "b.key")
    blob = kek.wrap(b"secret", b"key-a/v1")
    assert kek.unwrap(blob, b"key-a/v1") == b"secret"
    with pytest.raises(DecryptionError):
        kek.unwrap(blob, b"key-a/v2")
    with pytest.raises(DecryptionError):
        other.unwrap(blob, b"key-a/v1")
    # Relabelling the blob with the other key's id does not help either.
    relabelled = blob.replace(kek.key_id.encode(), other.key_id.encode())
    with pytest.raises(DecryptionError):
        other.unwrap(relabelled, b"key-a/v1")


def test_nonces_are_fresh(tmp_path: Path) -> None:
    kek = FileKek(tmp_path / "k.key")
    assert kek.wrap(b"same", b"aad") != kek.wrap(b"same", b"aad")


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "kek.bin"
    first = FileKek(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    second = FileKek(path)
    assert second.key_id == first.key_id
    assert second.unwrap(first.wrap(b"x", b""), b"") == b"x"


def test_key_file_hygiene_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="cannot be opened"):
        FileKek(tmp_path / "missing.key", create=False)
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    with pytest.raises(KekError, match="chmod 600"):
        FileKek(loose)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(KekError, match="exactly 32 bytes"):
        FileKek(short)
    link = tmp_path / "link.key"
    link.symlink_to(short)
    with pytest.raises(KekError):
        FileKek(link, create=False)
