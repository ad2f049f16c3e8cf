"""PKCS#11 KEK against a real SoftHSM2 token: in-token AES-GCM, key attributes, tamper, threads."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import UserAlreadyLoggedIn

from veil.services.keyvault.errors import DecryptionError, KekError
from veil.services.keyvault.kek import Pkcs11Kek

from .support import SoftHsm


def open_kek(softhsm: SoftHsm, label: str, *, create: bool = True) -> Pkcs11Kek:
    return Pkcs11Kek(
        softhsm.module, token_label=softhsm.token_label, pin=softhsm.pin, key_label=label, create=create
    )


@contextmanager
def user_session(softhsm: SoftHsm) -> Iterator[pkcs11.Session]:
    """A logged-in R/W session outside the KEK (login state is shared per process)."""
    token = pkcs11.lib(softhsm.module).get_token(token_label=softhsm.token_label)
    try:
        session = token.open(rw=True, user_pin=softhsm.pin)
    except UserAlreadyLoggedIn:
        session = token.open(rw=True)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def label() -> str:
    return f"kek-{uuid.uuid4().hex[:12]}"


def test_wrap_unwrap_round_trip_and_key_reuse(softhsm: SoftHsm, label: str) -> None:
    kek = open_kek(softhsm, label)
    try:
        assert kek.provider == "pkcs11"
        assert kek.key_id == f"pkcs11-{label}"
        blob = kek.wrap(b"\x07" * 32, b"orders/v1")
        assert kek.unwrap(blob, b"orders/v1") == b"\x07" * 32
        # A second instance (a restarted replica) finds the same key by label.
        again = open_kek(softhsm, label, create=False)
        try:
            assert again.unwrap(blob, b"orders/v1") == b"\x07" * 32
        finally:
            again.close()
    finally:
        kek.close()


def test_key_is_created_non_extractable_and_sensitive(softhsm: SoftHsm, label: str) -> None:
    open_kek(softhsm, label).close()
    with user_session(softhsm) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=label)
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.VALUE_LEN] == 32


def test_tamper_and_wrong_aad_give_the_opaque_error(softhsm: SoftHsm, label: str) -> None:
    kek = open_kek(softhsm, label)
    try:
        blob = kek.wrap(b"secret data key", b"aad")
        for index in (0, len(blob) // 2, len(blob) - 1):
            tampered = bytearray(blob)
            tampered[index] ^= 0x01
            with pytest.raises(DecryptionError):
                kek.unwrap(bytes(tampered), b"aad")
        with pytest.raises(DecryptionError):
            kek.unwrap(blob, b"other aad")
        # The session stays usable after the token refused a tag.
        assert kek.unwrap(blob, b"aad") == b"secret data key"
    finally:
        kek.close()


def test_missing_key_without_create_and_extractable_key_are_refused(softhsm: SoftHsm, label: str) -> None:
    with pytest.raises(KekError, match="no AES key labelled"):
        open_kek(softhsm, label, create=False)
    with user_session(softhsm) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    with pytest.raises(KekError, match="extractable or not sensitive"):
        open_kek(softhsm, label)


def test_unknown_token_is_refused(softhsm: SoftHsm, label: str) -> None:
    with pytest.raises(KekError, match="not available"):
        Pkcs11Kek(softhsm.module, token_label="no-such-token", pin=softhsm.pin, key_label=label)


def test_concurrent_use_from_threads(softhsm: SoftHsm, label: str) -> None:
    kek = open_kek(softhsm, label)
    try:

        def round_trip(index: int) -> bool:
            aad = f"key-{index}".encode()
            data = index.to_bytes(32, "big")
            return kek.unwrap(kek.wrap(data, aad), aad) == data

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(round_trip, range(64)))
    finally:
        kek.close()
