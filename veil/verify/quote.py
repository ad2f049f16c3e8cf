"""Strict parser for Intel SGX DCAP ECDSA quotes, version 3.

Layout (all integers little-endian; Intel ``sgx_quote_3.h``)::

    header             48 B   version, att key type, tee type, QE/PCE SVN, QE vendor, user data
    ISV report body   384 B   the enclave's REPORT body (MRENCLAVE, MRSIGNER, report_data ...)
    sig data length     4 B
    signature data      n B   ISV signature, attestation key, QE report body, QE signature,
                              QE auth data (2 B size + data), certification data
                              (2 B type + 4 B size + data; type 5 = PEM PCK chain)

Only what Veil verifies is accepted: version 3, ECDSA-P256 attestation key, SGX tee type,
Intel's QE vendor id and certification data type 5. Every length is bounds-checked and
trailing bytes are refused, so one byte string has exactly one reading.

Every refusal is a :class:`~veil.verify.errors.QuoteError` carrying a human-readable ``reason``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from veil.verify.errors import QuoteFormatError

# --- layout constants --------------------------------------------------------------------

HEADER_SIZE = 48
REPORT_BODY_SIZE = 384
#: The ISV signature covers header ‖ report body: bytes [0, 432).
SIGNED_SIZE = HEADER_SIZE + REPORT_BODY_SIZE
ECDSA_SIGNATURE_SIZE = 64
ATTESTATION_KEY_SIZE = 64

QUOTE_VERSION_3 = 3
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0
CERT_DATA_TYPE_PCK_CHAIN = 5
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

ATTRIBUTE_DEBUG = 0x02


# --- data model --------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class ReportBody:
    """An SGX REPORT body (384 bytes); used for both the ISV enclave and the QE report."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    raw: bytes

    @property
    def attribute_flags(self) -> int:
        """The low 8 bytes of ATTRIBUTES (INIT, DEBUG, MODE64BIT, ... bits)."""
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def xfrm(self) -> int:
        """The high 8 bytes of ATTRIBUTES (XSAVE feature request mask)."""
        return int.from_bytes(self.attributes[8:], "little")

    @property
    def debug(self) -> bool:
        """True for a debug enclave, whose memory the host can read: never trust its secrets."""
        return bool(self.attribute_flags & ATTRIBUTE_DEBUG)


@dataclass(frozen=True)
class SignatureData:
    """``sgx_ql_ecdsa_sig_data_t`` with its QE auth data and certification data."""

    isv_signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes


@dataclass(frozen=True)
class Quote:
    """A parsed DCAP v3 quote. ``signed_bytes`` is what the attestation key signed."""

    header: QuoteHeader
    report_body: ReportBody
    signature_data: SignatureData
    raw: bytes

    @property
    def signed_bytes(self) -> bytes:
        """Header ‖ ISV report body: the message of the ISV (quote) signature."""
        return self.raw[:SIGNED_SIZE]


# --- parsing -----------------------------------------------------------------------------


class _Reader:
    """Bounds-checked little-endian cursor; every overrun is a QuoteFormatError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise QuoteFormatError(
                f"{self._what} truncated: {field} needs {size} bytes, {self.remaining} left"
            )
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value


def parse_report_body(raw: bytes) -> ReportBody:
    """Parse a 384-byte SGX report body (offsets from ``sgx_report_body_t``)."""
    if len(raw) != REPORT_BODY_SIZE:
        raise QuoteFormatError(f"report body must be {REPORT_BODY_SIZE} bytes, got {len(raw)}")
    return ReportBody(
        cpu_svn=raw[0:16],
        misc_select=int.from_bytes(raw[16:20], "little"),
        isv_ext_prod_id=raw[32:48],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        config_id=raw[192:256],
        isv_prod_id=int.from_bytes(raw[256:258], "little"),
        isv_svn=int.from_bytes(raw[258:260], "little"),
        config_svn=int.from_bytes(raw[260:262], "little"),
        isv_family_id=raw[304:320],
        report_data=raw[320:384],
        raw=raw,
    )


def _parse_header(raw: bytes) -> QuoteHeader:
    version, att_key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", raw, 0)
    header = QuoteHeader(
        version=version,
        att_key_type=att_key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=raw[12:28],
        user_data=raw[28:48],
    )
    if header.version != QUOTE_VERSION_3:
        raise QuoteFormatError(f"unsupported quote version {header.version} (only 3)")
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError(f"unsupported attestation key type {header.att_key_type} (only 2, ECDSA-P256)")
    # v3 reserves this field; v4 reuses it as the TEE type. Non-zero is not an SGX v3 quote.
    if header.tee_type != TEE_TYPE_SGX:
        raise QuoteFormatError(f"unsupported TEE type {header.tee_type:#x} (only SGX)")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise QuoteFormatError(f"unknown QE vendor id {header.qe_vendor_id.hex()}")
    return header


def parse_quote(data: bytes) -> Quote:
    """Parse ``data`` as a DCAP v3 ECDSA-P256 quote with a PEM PCK chain.

    Parsing checks structure only; :func:`verifier.verify_quote` checks the signatures.
    """
    data = bytes(data)
    reader = _Reader(data, "quote")
    header = _parse_header(reader.take(HEADER_SIZE, "header"))
    report_body = parse_report_body(reader.take(REPORT_BODY_SIZE, "report body"))
    sig_len = reader.u32("signature data length")
    if sig_len != reader.remaining:
        raise QuoteFormatError(
            f"signature data length {sig_len} does not match the {reader.remaining} bytes "
            "after it (truncated quote or trailing bytes)"
        )
    signature_data = _parse_signature_data(reader.take(sig_len, "signature data"))
    return Quote(header=header, report_body=report_body, signature_data=signature_data, raw=data)


def _parse_signature_data(raw: bytes) -> SignatureData:
    reader = _Reader(raw, "signature data")
    isv_signature = reader.take(ECDSA_SIGNATURE_SIZE, "ISV signature")
    attestation_key = reader.take(ATTESTATION_KEY_SIZE, "attestation key")
    qe_report = parse_report_body(reader.take(REPORT_BODY_SIZE, "QE report"))
    qe_report_signature = reader.take(ECDSA_SIGNATURE_SIZE, "QE report signature")
    auth_size = reader.u16("QE auth data size")
    qe_auth_data = reader.take(auth_size, "QE auth data")
    cert_type = reader.u16("certification data type")
    cert_size = reader.u32("certification data size")
    if cert_type != CERT_DATA_TYPE_PCK_CHAIN:
        raise QuoteFormatError(f"unsupported certification data type {cert_type} (only 5, PEM PCK chain)")
    cert_data = reader.take(cert_size, "certification data")
    if reader.remaining:
        raise QuoteFormatError(f"{reader.remaining} trailing bytes after the certification data")
    return SignatureData(
        isv_signature=isv_signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        cert_data_type=cert_type,
        cert_data=cert_data,
    )
