"""Known-answer and structural tests of the DCAP v3 quote parser."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest

from veil.verify.errors import QuoteFormatError
from veil.verify.quote import parse_quote

from .vectors import QUOTE_A, QUOTE_B, QUOTE_C, QUOTE_D


@pytest.mark.parametrize("name", [QUOTE_A, QUOTE_B, QUOTE_C])
def test_parsed_fields_match_expected(
    name: str, quotes: dict[str, bytes], expected_fields: dict[str, dict[str, Any]]
) -> None:
    raw = quotes[name]
    want = expected_fields[name]
    assert hashlib.sha256(raw).hexdigest() == want["sha256_of_file"]
    assert len(raw) == want["size"]

    quote = parse_quote(raw)
    header, body, sig = quote.header, quote.report_body, quote.signature_data
    assert header.version == want["version"]
    assert header.att_key_type == want["att_key_type"]
    assert header.tee_type == want["att_key_data_0_or_tee"]
    assert header.qe_svn == want["qe_svn"]
    assert header.pce_svn == want["pce_svn"]
    assert header.qe_vendor_id.hex() == want["qe_vendor_id"]
    assert header.user_data.hex() == want["user_data"]

    assert body.cpu_svn.hex() == want["cpusvn"]
    assert body.misc_select == want["miscselect"]
    assert body.attribute_flags == int(want["attributes_flags"], 16)
    assert body.xfrm == int(want["attributes_xfrm"], 16)
    assert body.mr_enclave.hex() == want["mrenclave"]
    assert body.mr_signer.hex() == want["mrsigner"]
    assert body.isv_prod_id == want["isvprodid"]
    assert body.isv_svn == want["isvsvn"]
    assert body.report_data.hex() == want["reportdata"]
    assert body.debug is want["debug"]

    assert len(raw) - 436 == want["sig_data_len"]
    assert len(sig.qe_auth_data) == want["qe_auth_data_size"]
    assert sig.cert_data_type == want["cert_data_type"]
    assert len(sig.cert_data) == want["cert_data_size"]
    assert sig.cert_data.count(b"-----BEGIN CERTIFICATE-----") == want["pem_certs_in_chain"]
    assert sig.qe_report.isv_prod_id == want["qe_isvprodid"]
    assert sig.qe_report.isv_svn == want["qe_isvsvn"]
    assert sig.qe_report.mr_enclave.hex() == want["qe_report_mrenclave"]
    assert sig.qe_report.mr_signer.hex() == want["qe_report_mrsigner"]
    assert quote.signed_bytes == raw[:432]


def test_occlum_quote_fields(quotes: dict[str, bytes]) -> None:
    body = parse_quote(quotes[QUOTE_D]).report_body
    assert body.isv_prod_id == 4000
    assert body.isv_svn == 5000
    assert body.mr_enclave.hex().startswith("9c90fd81")
    assert body.mr_enclave.hex().endswith("1e2c")
    assert body.mr_signer.hex().startswith("6d5ead54")
    assert body.mr_signer.hex().endswith("1e02")
    assert body.attribute_flags & 0x80  # KSS
    assert not body.debug


@pytest.mark.parametrize("length", [0, 1, 47, 48, 431, 432, 435, 436, 500, 947, 1012, 1013, 1046, 1050, -1])
def test_truncated_quote_is_refused(quote_a: bytes, length: int) -> None:
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(quote_a[:length])
    assert info.value.reason


def test_trailing_bytes_are_refused(quote_a: bytes) -> None:
    with pytest.raises(QuoteFormatError, match="trailing"):
        parse_quote(quote_a + b"\x00")


def test_trailing_bytes_inside_signature_data_are_refused(quote_a: bytes) -> None:
    sig_len = struct.unpack_from("<I", quote_a, 432)[0]
    forged = quote_a[:432] + struct.pack("<I", sig_len + 3) + quote_a[436:] + b"abc"
    with pytest.raises(QuoteFormatError, match="trailing bytes after the certification data"):
        parse_quote(forged)


def _patch(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, struct.pack("<H", 4), "version 4"),
        (0, struct.pack("<H", 2), "version 2"),
        (2, struct.pack("<H", 3), "attestation key type 3"),
        (4, struct.pack("<I", 0x81), "TEE type 0x81"),
        (12, b"\x00" * 16, "QE vendor"),
        (1014 + 32, struct.pack("<H", 4), "certification data type 4"),
        (1014 + 32, struct.pack("<H", 6), "certification data type 6"),
    ],
)
def test_unsupported_header_and_cert_type_are_refused(
    quote_a: bytes, offset: int, value: bytes, reason: str
) -> None:
    with pytest.raises(QuoteFormatError, match=reason):
        parse_quote(_patch(quote_a, offset, value))


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (1012, struct.pack("<H", 0xFFFF)),  # QE auth data runs past the end
        (1012, struct.pack("<H", 0)),  # cert type/size read from auth data bytes
        (1048, struct.pack("<I", 0xFFFFFFFF)),  # cert data size past the end
        (1048, struct.pack("<I", 10)),  # cert data shorter than what remains
        (432, struct.pack("<I", 0)),  # signature data length
    ],
)
def test_inconsistent_lengths_are_refused(quote_a: bytes, offset: int, value: bytes) -> None:
    with pytest.raises(QuoteFormatError):
        parse_quote(_patch(quote_a, offset, value))
