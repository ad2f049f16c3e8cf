"""End-to-end quote verification: real Intel quotes, tampering, swapped certificates, fakes."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.verify.errors import CertificateChainError, QuoteError, QuoteFormatError, QuoteSignatureError
from veil.verify.pck import parse_pem_chain
from veil.verify.quote import parse_quote
from veil.verify.verifier import VerifiedQuote, verify_quote

from . import fakes
from .vectors import NOW, QUOTE_A, QUOTE_A_FACTS, QUOTE_B, QUOTE_C, QUOTE_D, RUNTIME_DATA_C, vector_path

CONTRACT_KEYS = {"mrenclave", "mrsigner", "isv_prod_id", "isv_svn", "debug", "report_data"}

# Regions of quote A covered by a signature or a hash binding: [start, end).
SIGNED_REGIONS = {
    "header": (0, 48),
    "report body": (48, 432),
    "ISV signature": (436, 500),
    "attestation key": (500, 564),
    "QE report": (564, 948),
    "QE report signature": (948, 1012),
    "QE auth data": (1014, 1046),
}


def _flip(raw: bytes, offset: int, mask: int = 0x01) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ mask]) + raw[offset + 1 :]


@pytest.mark.parametrize("name", [QUOTE_A, QUOTE_B, QUOTE_C])
def test_real_quotes_verify_with_expected_fields(
    name: str,
    quotes: dict[str, bytes],
    expected_fields: dict[str, dict[str, Any]],
    intel_root: ec.EllipticCurvePublicKey,
) -> None:
    want = expected_fields[name]
    result = verify_quote(quotes[name], root_public_key=intel_root, now=NOW)
    assert result.mrenclave.hex() == want["mrenclave"]
    assert result.mrsigner.hex() == want["mrsigner"]
    assert result.isv_prod_id == want["isvprodid"]
    assert result.isv_svn == want["isvsvn"]
    assert result.debug is want["debug"]
    assert result.report_data.hex() == want["reportdata"]
    assert result.tcb_status is None
    assert result.advisory_ids == ()
    assert set(result.to_json_dict()) == CONTRACT_KEYS


def test_occlum_quote_verifies(quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey) -> None:
    result = verify_quote(quotes[QUOTE_D], root_public_key=intel_root, now=NOW)
    assert (result.isv_prod_id, result.isv_svn) == (4000, 5000)
    assert result.mrenclave.hex().startswith("9c90fd81")
    assert result.mrsigner.hex().startswith("6d5ead54")
    assert result.debug is False


def test_mobilecoin_quote_is_debug(quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey) -> None:
    assert verify_quote(quotes[QUOTE_B], root_public_key=intel_root, now=NOW).debug is True


def test_azure_quote_binds_its_runtime_data(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    result = verify_quote(quotes[QUOTE_C], root_public_key=intel_root, now=NOW)
    runtime_data = vector_path(RUNTIME_DATA_C).read_bytes()
    assert result.report_data[:32] == hashlib.sha256(runtime_data).digest()


def test_json_dict_is_the_cli_contract(quote_a: bytes, intel_root: ec.EllipticCurvePublicKey) -> None:
    result = verify_quote(quote_a, root_public_key=intel_root, now=NOW)
    assert result.to_json_dict() == QUOTE_A_FACTS


def _offsets(start: int, end: int) -> list[int]:
    """First, last and six evenly spread offsets of a region."""
    step = max(1, (end - start) // 7)
    return sorted({start, end - 1, *range(start, end, step)})


@pytest.mark.parametrize(
    ("region", "offset"),
    [(region, offset) for region, (start, end) in SIGNED_REGIONS.items() for offset in _offsets(start, end)],
)
def test_flipped_byte_in_signed_region_is_refused(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey, region: str, offset: int
) -> None:
    for mask in (0x01, 0x80):
        with pytest.raises(QuoteError) as info:
            verify_quote(_flip(quote_a, offset, mask), root_public_key=intel_root, now=NOW)
        assert info.value.reason, region


@settings(max_examples=400, deadline=None, derandomize=True)
@given(offset=st.integers(0, 1045), bit=st.integers(0, 7))
def test_any_flipped_bit_before_the_certificates_is_refused(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey, offset: int, bit: int
) -> None:
    # Bytes 432-436 and 1012-1014 are lengths; all others are signed or hash-bound.
    with pytest.raises(QuoteError):
        verify_quote(_flip(quote_a, offset, 1 << bit), root_public_key=intel_root, now=NOW)


@pytest.mark.parametrize(
    ("region", "error", "reason"),
    [
        ("report body", QuoteSignatureError, "quote signature"),
        ("ISV signature", QuoteSignatureError, "quote signature"),
        ("attestation key", QuoteSignatureError, "bind the attestation key"),
        ("QE auth data", QuoteSignatureError, "bind the attestation key"),
        ("QE report", QuoteSignatureError, "QE report signature"),
        ("QE report signature", QuoteSignatureError, "QE report signature"),
    ],
)
def test_tamper_reasons_name_the_broken_link(
    quote_a: bytes,
    intel_root: ec.EllipticCurvePublicKey,
    region: str,
    error: type[QuoteError],
    reason: str,
) -> None:
    start, end = SIGNED_REGIONS[region]
    with pytest.raises(error, match=reason):
        verify_quote(_flip(quote_a, (start + end) // 2), root_public_key=intel_root, now=NOW)


def test_truncated_and_padded_quotes_are_refused(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey
) -> None:
    for forged in (quote_a[:-1], quote_a[:1000], quote_a + b"\x00", quote_a + quote_a):
        with pytest.raises(QuoteFormatError):
            verify_quote(forged, root_public_key=intel_root, now=NOW)


def test_wrong_root_is_refused(quote_a: bytes, fake_pki: fakes.FakePki) -> None:
    with pytest.raises(CertificateChainError, match="pinned root"):
        verify_quote(quote_a, root_public_key=fake_pki.root_public_key, now=NOW)


def test_pck_leaf_of_another_platform_is_refused(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    # B's leaf chains to the same Processor CA and root, so only the QE signature can tell.
    leaf_b = parse_pem_chain(parse_quote(quotes[QUOTE_B]).signature_data.cert_data, "b")[0]
    _, ca_a, root_a = parse_pem_chain(parse_quote(quotes[QUOTE_A]).signature_data.cert_data, "a")
    forged = fakes.replace_cert_data(quotes[QUOTE_A], fakes.pem(leaf_b, ca_a, root_a))
    with pytest.raises(QuoteSignatureError, match="QE report signature"):
        verify_quote(forged, root_public_key=intel_root, now=NOW)


@pytest.mark.parametrize("donor", [QUOTE_B, QUOTE_C, QUOTE_D])
def test_whole_chain_of_another_quote_is_refused(
    quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey, donor: str
) -> None:
    chain = parse_quote(quotes[donor]).signature_data.cert_data
    forged = fakes.replace_cert_data(quotes[QUOTE_A], chain)
    with pytest.raises(QuoteSignatureError):
        verify_quote(forged, root_public_key=intel_root, now=NOW)


def test_naive_time_is_a_programming_error(quote_a: bytes, intel_root: ec.EllipticCurvePublicKey) -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_quote(quote_a, root_public_key=intel_root, now=datetime(2025, 7, 1))


# --- quotes built under a throwaway root -------------------------------------------------


def test_fake_quote_verifies_with_its_root_only(
    fake_pki: fakes.FakePki, intel_root: ec.EllipticCurvePublicKey
) -> None:
    body = fakes.report_body(
        mrenclave=b"\xaa" * 32,
        mrsigner=b"\xbb" * 32,
        isv_prod_id=9,
        isv_svn=4,
        report_data=b"\xcc" * 64,
    )
    quote = fakes.build_quote(fake_pki, body=body)
    result = verify_quote(quote, root_public_key=fake_pki.root_public_key, now=NOW)
    assert isinstance(result, VerifiedQuote)
    assert (result.mrenclave, result.mrsigner) == (b"\xaa" * 32, b"\xbb" * 32)
    assert (result.isv_prod_id, result.isv_svn, result.debug) == (9, 4, False)
    assert result.report_data == b"\xcc" * 64
    with pytest.raises(CertificateChainError, match="pinned root"):
        verify_quote(quote, root_public_key=intel_root, now=NOW)


def test_fake_debug_enclave_is_reported(fake_pki: fakes.FakePki) -> None:
    body = fakes.report_body(attributes=bytes.fromhex("07000000000000000700000000000000"))
    quote = fakes.build_quote(fake_pki, body=body)
    assert verify_quote(quote, root_public_key=fake_pki.root_public_key, now=NOW).debug is True


def test_fake_quote_from_another_pki_is_refused(fake_pki: fakes.FakePki) -> None:
    other = fakes.make_pki()
    with pytest.raises(CertificateChainError):
        verify_quote(fakes.build_quote(other), root_public_key=fake_pki.root_public_key, now=NOW)


def test_qe_report_data_must_end_in_zeros(fake_pki: fakes.FakePki) -> None:
    parts = fakes.quote_parts(fake_pki)
    qe_report = parts.qe_report[:383] + b"\x01"
    forged = replace(
        parts, qe_report=qe_report, qe_report_signature=fakes.sign_raw(fake_pki.leaf_key, qe_report)
    )
    with pytest.raises(QuoteSignatureError, match="not zero"):
        verify_quote(fakes.assemble_quote(forged), root_public_key=fake_pki.root_public_key, now=NOW)


def test_attestation_key_off_the_curve_is_refused(fake_pki: fakes.FakePki) -> None:
    # A QE that vouched for garbage: binding and QE signature are valid, the key is not.
    parts = fakes.quote_parts(fake_pki)
    bad_key = b"\x01" * 64
    binding = hashlib.sha256(bad_key + parts.qe_auth_data).digest() + bytes(32)
    qe_report = parts.qe_report[:320] + binding
    forged = replace(
        parts,
        attestation_key=bad_key,
        qe_report=qe_report,
        qe_report_signature=fakes.sign_raw(fake_pki.leaf_key, qe_report),
    )
    with pytest.raises(QuoteFormatError, match="curve"):
        verify_quote(fakes.assemble_quote(forged), root_public_key=fake_pki.root_public_key, now=NOW)


def test_quote_signed_by_another_attestation_key_is_refused(fake_pki: fakes.FakePki) -> None:
    parts = fakes.quote_parts(fake_pki)
    stranger = fakes.new_key()
    forged = replace(parts, isv_signature=fakes.sign_raw(stranger, parts.header + parts.body))
    with pytest.raises(QuoteSignatureError, match="quote signature"):
        verify_quote(fakes.assemble_quote(forged), root_public_key=fake_pki.root_public_key, now=NOW)


# --- robustness: any mutation is a verdict, never a crash --------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_mutation_is_refused_or_harmless(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey, data: st.DataObject
) -> None:
    offset = data.draw(st.integers(0, len(quote_a) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != quote_a[offset]))
    mutated = quote_a[:offset] + bytes([value]) + quote_a[offset + 1 :]
    outcome = fakes.outcome(lambda: verify_quote(mutated, root_public_key=intel_root, now=NOW))
    if isinstance(outcome, QuoteError):
        assert outcome.reason
        return
    # Only the unsigned PEM text may change harmlessly (e.g. base64 padding bits).
    assert offset >= 1052
    assert outcome.to_json_dict() == verify_quote(quote_a, root_public_key=intel_root, now=NOW).to_json_dict()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_splice_is_refused(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey, data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, len(quote_a)))
    end = data.draw(st.integers(start, min(len(quote_a), start + 64)))
    insert = data.draw(st.binary(max_size=16))
    mutated = quote_a[:start] + insert + quote_a[end:]
    if mutated == quote_a:
        return
    with pytest.raises(QuoteError):
        verify_quote(mutated, root_public_key=intel_root, now=NOW)
