"""PCK chain verification (root pinned by key, validity, CNs) and the SGX extension reader."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from veil.verify.errors import CertificateChainError
from veil.verify.pck import parse_pem_chain, parse_sgx_extension, verify_pck_chain
from veil.verify.quote import parse_quote

from . import fakes
from .vectors import NOW, QUOTE_A, QUOTE_B, QUOTE_C, QUOTE_D


def _cert_data(raw: bytes) -> bytes:
    return parse_quote(raw).signature_data.cert_data


def test_sgx_extension_of_quote_a(quote_a: bytes, intel_root: ec.EllipticCurvePublicKey) -> None:
    chain = verify_pck_chain(_cert_data(quote_a), root_public_key=intel_root, now=NOW)
    sgx = chain.sgx
    assert sgx.fmspc.hex() == "00a067110000"
    assert sgx.pce_id == b"\x00\x00"
    assert sgx.pce_svn == 13
    assert sgx.component_svns == (11, 11, 2, 2, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert sgx.cpu_svn == bytes(sgx.component_svns)
    assert sgx.sgx_type == 0
    assert len(sgx.ppid) == 16


def test_platform_ca_chain_of_quote_d(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    chain = verify_pck_chain(_cert_data(quotes[QUOTE_D]), root_public_key=intel_root, now=NOW)
    assert "Platform CA" in chain.intermediate.subject.rfc4514_string()
    assert chain.sgx.fmspc.hex() == "30606a000000"
    assert chain.sgx.sgx_type == 1  # scalable


def test_root_is_pinned_by_key_not_by_certificate_bytes(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    old = verify_pck_chain(_cert_data(quotes[QUOTE_C]), root_public_key=intel_root, now=NOW)
    new = verify_pck_chain(_cert_data(quotes[QUOTE_A]), root_public_key=intel_root, now=NOW)
    assert old.root.not_valid_after_utc.year == 2033
    assert new.root.not_valid_after_utc.year == 2049
    assert old.root.tbs_certificate_bytes != new.root.tbs_certificate_bytes


@pytest.mark.parametrize(
    "when",
    [datetime(2023, 9, 1, tzinfo=UTC), datetime(2030, 9, 21, tzinfo=UTC)],
    ids=["before-leaf-notBefore", "after-leaf-notAfter"],
)
def test_chain_outside_validity_is_refused(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey, when: datetime
) -> None:
    with pytest.raises(CertificateChainError, match="not valid at"):
        verify_pck_chain(_cert_data(quote_a), root_public_key=intel_root, now=when)


def test_old_root_encoding_expiry_is_enforced(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    # Quote C's leaf expires in 2028, before its 2033 root; check the leaf wins first.
    with pytest.raises(CertificateChainError, match="leaf"):
        verify_pck_chain(
            _cert_data(quotes[QUOTE_C]),
            root_public_key=intel_root,
            now=datetime(2028, 5, 1, tzinfo=UTC),
        )


def test_wrong_root_is_refused(quote_a: bytes, fake_pki: fakes.FakePki) -> None:
    with pytest.raises(CertificateChainError, match="pinned root"):
        verify_pck_chain(_cert_data(quote_a), root_public_key=fake_pki.root_public_key, now=NOW)


def test_chain_from_mixed_vectors_is_refused(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    leaf_d = parse_pem_chain(_cert_data(quotes[QUOTE_D]), "d")[0]
    _, ca_a, root_a = parse_pem_chain(_cert_data(quotes[QUOTE_A]), "a")
    # D's leaf was issued by the Platform CA, not A's Processor CA.
    with pytest.raises(CertificateChainError, match="not signed by its issuer"):
        verify_pck_chain(fakes.pem(leaf_d, ca_a, root_a), root_public_key=intel_root, now=NOW)


def test_chain_in_wrong_order_is_refused(quote_a: bytes, intel_root: ec.EllipticCurvePublicKey) -> None:
    leaf, ca, root = parse_pem_chain(_cert_data(quote_a), "a")
    with pytest.raises(CertificateChainError):
        verify_pck_chain(fakes.pem(ca, leaf, root), root_public_key=intel_root, now=NOW)


def test_chain_length_must_be_three(quote_a: bytes, intel_root: ec.EllipticCurvePublicKey) -> None:
    leaf, ca, root = parse_pem_chain(_cert_data(quote_a), "a")
    for certs in [(leaf, root), (leaf, ca, ca, root)]:
        with pytest.raises(CertificateChainError, match="expected 3"):
            verify_pck_chain(fakes.pem(*certs), root_public_key=intel_root, now=NOW)


def test_pem_chain_parsing_is_strict(quote_a: bytes) -> None:
    data = _cert_data(quote_a)
    assert data.endswith(b"\x00")  # C string terminator in the real quote: tolerated
    assert len(parse_pem_chain(data, "a")) == 3
    first_end = data.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----")
    for bad in [
        b"",
        b"\x00",
        data[:first_end] + b"\njunk\n" + data[first_end:],
        b"junk" + data,
        data.rstrip(b"\x00") + b"trailing",
        data.replace(b"-----END CERTIFICATE-----", b"-----END CERTIFICATE----", 1),
    ]:
        with pytest.raises(CertificateChainError):
            parse_pem_chain(bad, "test chain")


def test_fake_chain_verifies_under_its_own_root(fake_pki: fakes.FakePki) -> None:
    chain = verify_pck_chain(fake_pki.pck_chain_pem(), root_public_key=fake_pki.root_public_key, now=NOW)
    assert chain.sgx.fmspc == fakes.FMSPC
    assert chain.sgx.component_svns == fakes.COMPONENT_SVNS
    assert chain.sgx.pce_svn == fakes.PCE_SVN


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"leaf_cn": "Test SGX Other Certificate"}, "SGX PCK Certificate"),
        ({"ca_cn": "Test SGX Some CA"}, "Processor/Platform CA"),
    ],
)
def test_pck_common_names_are_checked(kwargs: dict[str, Any], reason: str) -> None:
    pki = fakes.make_pki(**kwargs)
    with pytest.raises(CertificateChainError, match=reason):
        verify_pck_chain(pki.pck_chain_pem(), root_public_key=pki.root_public_key, now=NOW)


_OID = fakes.der_oid
_SGX = fakes.SGX_OID


def _ext_without(index: int) -> bytes:
    """The SGX extension with its top-level entry ``index`` removed."""
    good = fakes.sgx_extension_der()
    entries = []
    pos = 4  # 30 82 LL LL
    while pos < len(good):
        length = good[pos + 1]
        size = (
            2 + length
            if length < 0x80
            else 2 + (length & 0x7F) + int.from_bytes(good[pos + 2 : pos + 2 + (length & 0x7F)], "big")
        )
        entries.append(good[pos : pos + size])
        pos += size
    return fakes.der_seq(*(e for i, e in enumerate(entries) if i != index))


@pytest.mark.parametrize(
    ("extension", "reason"),
    [
        (fakes.sgx_extension_der() + b"\x05\x00", "exactly one element"),
        (fakes.sgx_extension_der() + b"\x00", "truncated length"),
        (b"\x30\x80" + fakes.sgx_extension_der()[4:] + b"\x00\x00", "indefinite"),
        (b"\x30\x81\x05" + fakes.der_seq(_OID(f"{_SGX}.9")), "non-minimal length"),
        (fakes.sgx_extension_der()[:-3], "runs past the end"),
        (_ext_without(3), "FMSPC"),
        (_ext_without(2), "PCEID"),
        (_ext_without(1), "TCB"),
        (fakes.sgx_extension_der(fmspc=b"\x00" * 5), "FMSPC must be 6 bytes"),
        (fakes.sgx_extension_der(component_svns=(256,) + (0,) * 15), "out of range"),
        (fakes.sgx_extension_der(pce_svn=-1), "out of range"),
        (
            fakes.der_seq(
                fakes.der_seq(_OID(f"{_SGX}.4"), fakes.der_octets(b"\x00" * 6)),
                fakes.der_seq(_OID(f"{_SGX}.4"), fakes.der_octets(b"\x00" * 6)),
            ),
            "duplicate",
        ),
    ],
)
def test_malformed_sgx_extension_is_refused(extension: bytes, reason: str) -> None:
    pki = fakes.make_pki(sgx_extension=extension)
    with pytest.raises(CertificateChainError, match=reason):
        parse_sgx_extension(pki.leaf)
    with pytest.raises(CertificateChainError):
        verify_pck_chain(pki.pck_chain_pem(), root_public_key=pki.root_public_key, now=NOW)


def test_missing_sgx_extension_is_refused(fake_pki: fakes.FakePki) -> None:
    with pytest.raises(CertificateChainError, match="not present"):
        parse_sgx_extension(fake_pki.ca)


def test_leaf_of_another_vector_has_its_own_platform(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    b = verify_pck_chain(_cert_data(quotes[QUOTE_B]), root_public_key=intel_root, now=NOW)
    a = verify_pck_chain(_cert_data(quotes[QUOTE_A]), root_public_key=intel_root, now=NOW)
    assert a.sgx.fmspc != b.sgx.fmspc
    assert a.sgx.ppid != b.sgx.ppid
