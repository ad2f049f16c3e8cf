"""Build complete DCAP v3 quotes and collateral under a throwaway root, for tests.

Everything Intel would sign is signed here by keys made on the spot: a root CA, a PCK CA,
a PCK leaf carrying the SGX extension, a TCB Signing certificate, CRLs, TCB info and QE
identity. The bytes follow the real formats, so the verifier under test cannot tell them
from Intel's except by the root key it pins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.dev import collateral as dev_collateral
from veil.dev import pki as dev_pki
from veil.verify.errors import QuoteError
from veil.verify.quote import INTEL_QE_VENDOR_ID
from veil.verify.verifier import INTEL_QE_ISV_PROD_ID, INTEL_QE_MRSIGNER, VerifiedQuote

NOW = datetime(2025, 7, 1, tzinfo=UTC)
CERT_NOT_BEFORE = datetime(2025, 1, 1, tzinfo=UTC)
CERT_NOT_AFTER = datetime(2030, 1, 1, tzinfo=UTC)
COLLATERAL_ISSUED = datetime(2025, 6, 15, tzinfo=UTC)
COLLATERAL_NEXT_UPDATE = datetime(2025, 7, 15, tzinfo=UTC)

FMSPC = bytes.fromhex("00906ea10000")
PCE_ID = bytes.fromhex("0000")
COMPONENT_SVNS = (11, 11, 2, 2, 255, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0)
PCE_SVN = 13
QE_ISV_SVN = 8
# INIT | MODE64BIT | PROVISIONKEY: what Intel's QE reports (identity masks out MODE64BIT).
QE_ATTRIBUTES = bytes.fromhex("15000000000000000700000000000000")

SGX_OID = "1.2.840.113741.1.13.1"


# --- DER (the SGX extension): the dev PKI's writer ---------------------------------------

der_oid = dev_pki.der_oid
der_int = dev_pki.der_int
der_octets = dev_pki.der_octets
der_seq = dev_pki.der_seq


def sgx_extension_der(
    *,
    component_svns: tuple[int, ...] = COMPONENT_SVNS,
    pce_svn: int = PCE_SVN,
    fmspc: bytes = FMSPC,
    pce_id: bytes = PCE_ID,
    ppid: bytes = b"\x42" * 16,
) -> bytes:
    """The SGX extension value as Intel encodes it for a processor-CA PCK certificate (CPUSVN
    the component SVNs' low bytes)."""
    extension = dev_pki.sgx_pck_extension(
        fmspc=fmspc,
        pceid=pce_id,
        pcesvn=pce_svn,
        cpusvn=bytes(svn & 0xFF for svn in component_svns),
        component_svns=component_svns,
        ppid=ppid,
    )
    return extension.value


# --- keys and certificates ---------------------------------------------------------------

pem = dev_collateral.pem
sign_raw = dev_collateral.sign_raw


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``X ‖ Y`` without the 0x04 prefix, as quotes carry keys."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Veil Test"),
        ]
    )


def make_cert(
    *,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
    path_length: int | None = None,
    not_before: datetime = CERT_NOT_BEFORE,
    not_after: datetime = CERT_NOT_AFTER,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class FakePki:
    """A throwaway SGX-like PKI: root → PCK CA → PCK leaf, and root → TCB Signing."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    tcb_signer: x509.Certificate

    @property
    def root_public_key(self) -> ec.EllipticCurvePublicKey:
        return self.root_key.public_key()

    def pck_chain_pem(self) -> bytes:
        return pem(self.leaf, self.ca, self.root)


def make_pki(
    *,
    leaf_cn: str = "Test SGX PCK Certificate",
    ca_cn: str = "Test SGX PCK Processor CA",
    leaf_not_before: datetime = CERT_NOT_BEFORE,
    leaf_not_after: datetime = CERT_NOT_AFTER,
    sgx_extension: bytes | None = None,
    **extension_fields: Any,
) -> FakePki:
    """Make a fresh PKI; ``extension_fields`` go to :func:`sgx_extension_der`."""
    root_key, ca_key, leaf_key, tcb_key = new_key(), new_key(), new_key(), new_key()
    root = make_cert(
        subject="Test SGX Root CA",
        key=root_key,
        issuer=None,
        issuer_key=root_key,
        ca=True,
        path_length=1,
    )
    ca = make_cert(subject=ca_cn, key=ca_key, issuer=root, issuer_key=root_key, ca=True, path_length=0)
    ext_value = sgx_extension if sgx_extension is not None else sgx_extension_der(**extension_fields)
    leaf = make_cert(
        subject=leaf_cn,
        key=leaf_key,
        issuer=ca,
        issuer_key=ca_key,
        ca=False,
        not_before=leaf_not_before,
        not_after=leaf_not_after,
        extensions=(x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_OID), ext_value),),
    )
    tcb_signer = make_cert(
        subject="Test SGX TCB Signing", key=tcb_key, issuer=root, issuer_key=root_key, ca=False
    )
    return FakePki(root_key, root, ca_key, ca, leaf_key, leaf, tcb_key, tcb_signer)


# --- quotes ------------------------------------------------------------------------------


def report_body(
    *,
    cpu_svn: bytes = bytes(COMPONENT_SVNS),
    misc_select: int = 0,
    attributes: bytes = bytes.fromhex("05000000000000000700000000000000"),
    mrenclave: bytes = b"\xe1" * 32,
    mrsigner: bytes = b"\x51" * 32,
    isv_prod_id: int = 7,
    isv_svn: int = 3,
    report_data: bytes = b"\x00" * 64,
) -> bytes:
    """A 384-byte SGX report body (reserved fields zero)."""
    body = bytearray(384)
    body[0:16] = cpu_svn
    body[16:20] = misc_select.to_bytes(4, "little")
    body[48:64] = attributes
    body[64:96] = mrenclave
    body[128:160] = mrsigner
    body[256:258] = isv_prod_id.to_bytes(2, "little")
    body[258:260] = isv_svn.to_bytes(2, "little")
    body[320:384] = report_data
    return bytes(body)


@dataclass
class QuoteParts:
    """Inputs of :func:`assemble_quote`; tests change one part to forge a quote."""

    header: bytes
    body: bytes
    isv_signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data: bytes
    cert_data_type: int = 5
    extra: bytes = field(default=b"")


def header(*, qe_svn: int = QE_ISV_SVN, pce_svn: int = PCE_SVN, version: int = 3) -> bytes:
    return (
        version.to_bytes(2, "little")
        + (2).to_bytes(2, "little")
        + bytes(4)
        + qe_svn.to_bytes(2, "little")
        + pce_svn.to_bytes(2, "little")
        + INTEL_QE_VENDOR_ID
        + b"\x5a" * 16
        + bytes(4)
    )


class PckSigner(Protocol):
    """What signs a quote's QE report: a PCK leaf key and the chain that certifies it."""

    @property
    def leaf_key(self) -> ec.EllipticCurvePrivateKey: ...

    def pck_chain_pem(self) -> bytes: ...


@dataclass
class PemPckSigner:
    """A PCK signer loaded from files, e.g. the sim PCK chain of the dev PKI."""

    leaf_key: ec.EllipticCurvePrivateKey
    chain_pem: bytes

    def pck_chain_pem(self) -> bytes:
        return self.chain_pem


def quote_parts(
    pki: PckSigner,
    *,
    body: bytes | None = None,
    qe_isv_svn: int = QE_ISV_SVN,
    qe_mrsigner: bytes = INTEL_QE_MRSIGNER,
    qe_isv_prod_id: int = INTEL_QE_ISV_PROD_ID,
    qe_attributes: bytes = QE_ATTRIBUTES,
    qe_auth_data: bytes = b"\x11" * 32,
    cert_data: bytes | None = None,
) -> QuoteParts:
    """Sign a quote the way the QE does: PCK key signs the QE report, which binds the key."""
    attestation_key = new_key()
    raw_key = raw_public(attestation_key)
    binding = hashlib.sha256(raw_key + qe_auth_data).digest() + bytes(32)
    qe_report = report_body(
        attributes=qe_attributes,
        mrenclave=b"\x9e" * 32,
        mrsigner=qe_mrsigner,
        isv_prod_id=qe_isv_prod_id,
        isv_svn=qe_isv_svn,
        report_data=binding,
    )
    head = header()
    enclave_body = body if body is not None else report_body()
    return QuoteParts(
        header=head,
        body=enclave_body,
        isv_signature=sign_raw(attestation_key, head + enclave_body),
        attestation_key=raw_key,
        qe_report=qe_report,
        qe_report_signature=sign_raw(pki.leaf_key, qe_report),
        qe_auth_data=qe_auth_data,
        cert_data=cert_data if cert_data is not None else pki.pck_chain_pem() + b"\x00",
    )


def assemble_quote(parts: QuoteParts) -> bytes:
    """Lay the parts out in DCAP v3 order with consistent length fields."""
    sig_data = (
        parts.isv_signature
        + parts.attestation_key
        + parts.qe_report
        + parts.qe_report_signature
        + len(parts.qe_auth_data).to_bytes(2, "little")
        + parts.qe_auth_data
        + parts.cert_data_type.to_bytes(2, "little")
        + len(parts.cert_data).to_bytes(4, "little")
        + parts.cert_data
    )
    return parts.header + parts.body + len(sig_data).to_bytes(4, "little") + sig_data + parts.extra


def build_quote(pki: PckSigner, **kwargs: Any) -> bytes:
    """A complete, validly signed DCAP v3 quote under ``pki``."""
    return assemble_quote(quote_parts(pki, **kwargs))


def replace_cert_data(quote: bytes, cert_data: bytes) -> bytes:
    """Swap the certification data of any v3 quote (e.g. a real one), fixing the lengths."""
    auth_size = int.from_bytes(quote[1012:1014], "little")
    cert_header = 1014 + auth_size
    prefix = quote[436 : cert_header + 2]  # signature data up to and including the cert type
    sig_data = prefix + len(cert_data).to_bytes(4, "little") + cert_data
    return quote[:432] + len(sig_data).to_bytes(4, "little") + sig_data


# --- collateral (the product's dev_collateral, with this module's defaults) -------------

TCB_DATE = "2024-03-13T00:00:00Z"


def tcb_level(
    status: str,
    *,
    components: tuple[int, ...] = COMPONENT_SVNS,
    pce_svn: int = PCE_SVN,
    advisories: tuple[str, ...] = (),
) -> dict[str, Any]:
    return dev_collateral.tcb_level(
        status, components=components, pce_svn=pce_svn, tcb_date=TCB_DATE, advisories=advisories
    )


def qe_level(isv_svn: int, status: str, advisories: tuple[str, ...] = ()) -> dict[str, Any]:
    return dev_collateral.qe_level(isv_svn, status, tcb_date=TCB_DATE, advisories=advisories)


def tcb_info_json(
    *,
    levels: list[dict[str, Any]] | None = None,
    fmspc: bytes = FMSPC,
    pce_id: bytes = PCE_ID,
    issued: datetime = COLLATERAL_ISSUED,
    next_update: datetime = COLLATERAL_NEXT_UPDATE,
    version: int = 3,
    tcb_id: str = "SGX",
) -> str:
    return dev_collateral.tcb_info_json(
        levels=levels if levels is not None else [tcb_level("UpToDate")],
        fmspc=fmspc,
        pce_id=pce_id,
        issued=issued,
        next_update=next_update,
        version=version,
        tcb_id=tcb_id,
    )


def qe_identity_json(
    *,
    levels: list[dict[str, Any]] | None = None,
    mrsigner: bytes = INTEL_QE_MRSIGNER,
    isv_prod_id: int = INTEL_QE_ISV_PROD_ID,
    issued: datetime = COLLATERAL_ISSUED,
    next_update: datetime = COLLATERAL_NEXT_UPDATE,
) -> str:
    return dev_collateral.qe_identity_json(
        levels=levels if levels is not None else [qe_level(QE_ISV_SVN, "UpToDate")],
        issued=issued,
        next_update=next_update,
        mrsigner=mrsigner,
        isv_prod_id=isv_prod_id,
    )


def make_crl(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    revoked: tuple[x509.Certificate, ...] = (),
    last_update: datetime = COLLATERAL_ISSUED,
    next_update: datetime = COLLATERAL_NEXT_UPDATE,
) -> bytes:
    return dev_collateral.make_crl(
        issuer, issuer_key, last_update=last_update, next_update=next_update, revoked=revoked
    )


def build_collateral(
    pki: FakePki,
    *,
    tcb_info: str | None = None,
    qe_identity: str | None = None,
    root_crl: bytes | None = None,
    pck_crl: bytes | None = None,
    tcb_signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> dict[str, str]:
    """Collateral in the dcap-qvl JSON layout, every document signed under ``pki``."""
    signer_cert, signer_key = tcb_signer if tcb_signer is not None else (pki.tcb_signer, pki.tcb_key)
    return dev_collateral.collateral_json(
        root=pki.root,
        pck_ca=pki.ca,
        signer=signer_cert,
        signer_key=signer_key,
        tcb_info=tcb_info if tcb_info is not None else tcb_info_json(),
        qe_identity=qe_identity if qe_identity is not None else qe_identity_json(),
        root_crl=root_crl if root_crl is not None else make_crl(pki.root, pki.root_key),
        pck_crl=pck_crl if pck_crl is not None else make_crl(pki.ca, pki.ca_key),
    )


def outcome(verify: Callable[[], VerifiedQuote]) -> VerifiedQuote | QuoteError:
    """The verdict as a value: the verified quote or the refusal (anything else propagates)."""
    try:
        return verify()
    except QuoteError as exc:
        return exc
