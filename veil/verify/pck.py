"""PCK certificate chain verification and the SGX extension of the PCK leaf.

The quote's certification data carries ``PCK leaf ‖ PCK Processor/Platform CA ‖ Root CA``
as PEM. Trust comes from a root **public key** pinned by the caller, never from certificate
bytes: Intel has published two encodings of the same SGX Root CA (notAfter 2033 and 2049)
and both occur in real quotes. The helpers for chains and raw ECDSA signatures are shared
with ``collateral``, whose TCB-signing and CRL-issuer chains end at the same root.

The PCK leaf's SGX extension (OID 1.2.840.113741.1.13.1) is opaque to ``cryptography``
(an ``UnrecognizedExtension``), so a minimal strict DER reader decodes it here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from veil.verify.errors import CertificateChainError, QuoteError, QuoteFormatError

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = SGX_EXTENSION_OID.dotted_string
_PPID, _TCB, _PCEID, _FMSPC, _SGX_TYPE = (f"{_SGX}.{n}" for n in (1, 2, 3, 4, 5))
_PCESVN = f"{_TCB}.17"
_CPUSVN = f"{_TCB}.18"
COMPONENT_COUNT = 16

PCK_LEAF_CN_PHRASE = "SGX PCK Certificate"
PCK_CA_CN_PHRASES = ("SGX PCK Processor CA", "SGX PCK Platform CA")

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")
_PEM_SEPARATOR = re.compile(rb"[ \t\r\n]*")


# --- keys and signatures -----------------------------------------------------------------


def public_key_point(key: object) -> bytes:
    """The X9.62 uncompressed point of a P-256 key; refuse any other key type."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateChainError("expected an ECDSA P-256 public key")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def same_public_key(a: object, b: ec.EllipticCurvePublicKey) -> bool:
    """True when ``a`` is the same P-256 key as ``b`` (by curve point, not by encoding)."""
    try:
        return public_key_point(a) == public_key_point(b)
    except CertificateChainError:
        return False


def p256_key_from_raw(raw: bytes) -> ec.EllipticCurvePublicKey:
    """Load a raw ``X ‖ Y`` (64 bytes, no 0x04 prefix) P-256 key as carried in quotes."""
    if len(raw) != 64:
        raise QuoteFormatError(f"raw P-256 public key must be 64 bytes, got {len(raw)}")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise QuoteFormatError("attestation key is not a point on the P-256 curve") from None


def ecdsa_p256_verify(key: ec.EllipticCurvePublicKey, raw_signature: bytes, message: bytes) -> bool:
    """Verify a raw big-endian ``r ‖ s`` ECDSA-P256-SHA256 signature (Intel's format)."""
    if len(raw_signature) != 64:
        return False
    r = int.from_bytes(raw_signature[:32], "big")
    s = int.from_bytes(raw_signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# --- certificate chains ------------------------------------------------------------------


#: What ``cryptography`` raises for a structurally valid but semantically broken encoding.
#: ``UserWarning`` covers its warnings about malformed fields (e.g. a negative serial number, a
#: wrong-length country name) where warnings are errors (the tests): such a certificate is
#: refused, never an escaping exception. Elsewhere they stay warnings and the chain checks
#: refuse the certificate later.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
    UnsupportedAlgorithm,
    UserWarning,
)

_SIGNATURE_ERRORS: tuple[type[Exception], ...] = (*DECODE_ERRORS, InvalidSignature)

# Parsing and signature checks are pure functions of the exact bytes, and a verifier sees the
# same PCK chains and collateral again and again (every attestation of a platform): they are
# memoized, bounded. Validity times and revocation are still checked on every call.
memoized = functools.lru_cache(maxsize=512)


@memoized
def _load_certificate(pem_block: bytes) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(pem_block)
    # cryptography decodes names, extensions and keys lazily: decode them now so a broken
    # certificate is refused here rather than raising in the middle of verification.
    _ = (cert.subject, cert.issuer, cert.extensions, cert.public_key())
    return cert


def parse_pem_chain(
    data: bytes, what: str, error: type[QuoteError] = CertificateChainError
) -> list[x509.Certificate]:
    """Parse concatenated PEM certificates, refusing anything else between or after them.

    Quotes written by C code end the chain with a NUL terminator, which is tolerated.
    """
    body = data.rstrip(b"\x00")
    certs: list[x509.Certificate] = []
    pos = 0
    while True:
        sep = _PEM_SEPARATOR.match(body, pos)
        pos = sep.end() if sep else pos
        if pos == len(body):
            break
        block = _PEM_BLOCK.match(body, pos)
        if block is None:
            raise error(f"{what}: unexpected data at byte {pos} (not a PEM certificate)")
        try:
            cert = _load_certificate(block.group(0))
        except DECODE_ERRORS:
            raise error(f"{what}: certificate {len(certs) + 1} is not a valid certificate") from None
        certs.append(cert)
        pos = block.end()
    if not certs:
        raise error(f"{what}: no certificates")
    return certs


@memoized
def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key signed `cert` (certificates compare and hash by their DER)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except _SIGNATURE_ERRORS:
        return False
    return True


def common_name(name: x509.Name) -> str:
    """The (single) CN of a name, or an empty string."""
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else ""


def _check_validity(cert: x509.Certificate, now: datetime, label: str, error: type[QuoteError]) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise error(
            f"{label} is not valid at {now.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
        )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def verify_chain_to_root(
    certs: Sequence[x509.Certificate],
    *,
    root_public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    what: str,
    error: type[QuoteError] = CertificateChainError,
    leaf_is_ca: bool = False,
) -> None:
    """Check ``certs`` (leaf first, root last) is a valid chain to the pinned root key at ``now``.

    Every certificate must be within its validity period, signed by the next one, and every
    issuer must be a CA whose path length allows the certificates below it. The last
    certificate must carry the pinned key and be self-signed by it. The leaf must be an
    end entity, unless ``leaf_is_ca`` (a CRL issuer chain starts at a CA).
    """
    if len(certs) < 2:
        raise error(f"{what}: chain has {len(certs)} certificate(s), expected leaf ... root")
    root = certs[-1]
    if not same_public_key(root.public_key(), root_public_key):
        raise error(f"{what}: chain does not end at the pinned root public key")
    labels = ["leaf"] + [f"intermediate {i}" for i in range(1, len(certs) - 1)] + ["root"]
    for index, cert in enumerate(certs):
        label = f"{what} {labels[index]} ({common_name(cert.subject) or 'no CN'})"
        _check_validity(cert, now, label, error)
        issuer = certs[index + 1] if index + 1 < len(certs) else root
        if not _signed_by(cert, issuer):
            raise error(f"{label} is not signed by its issuer")
        constraints = _basic_constraints(cert)
        is_ca = constraints is not None and constraints.ca
        if index == 0 and not leaf_is_ca:
            if is_ca:
                raise error(f"{label} must not be a CA certificate")
            continue
        if constraints is None or not constraints.ca:
            raise error(f"{label} is not a CA certificate")
        # RFC 5280: pathLen counts the intermediate CAs between this CA and the path's end.
        if constraints.path_length is not None and constraints.path_length < index - 1:
            raise error(f"{label} path length constraint exceeded")


# --- SGX extension -----------------------------------------------------------------------

_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_OID = 0x06
_TAG_ENUMERATED = 0x0A
_TAG_SEQUENCE = 0x30


def _ext_error(reason: str) -> CertificateChainError:
    return CertificateChainError(f"PCK certificate SGX extension: {reason}")


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Split concatenated DER TLVs into ``(tag, content)``; definite minimal lengths only."""
    items: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise _ext_error("high-tag-number form is not used here")
        if pos + 1 >= len(data):
            raise _ext_error("truncated length")
        first = data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise _ext_error("indefinite length is not DER")
        else:
            count = first & 0x7F
            if count > 4 or pos + count > len(data):
                raise _ext_error("bad length")
            length_bytes = data[pos : pos + count]
            pos += count
            length = int.from_bytes(length_bytes, "big")
            if length_bytes[0] == 0 or length < 0x80:
                raise _ext_error("non-minimal length is not DER")
        if pos + length > len(data):
            raise _ext_error("value runs past the end")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _der_single(data: bytes, tag: int, what: str) -> bytes:
    items = _der_items(data)
    if len(items) != 1 or items[0][0] != tag:
        raise _ext_error(f"{what}: expected exactly one element with tag {tag:#04x}")
    return items[0][1]


def _decode_oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise _ext_error("truncated object identifier")
    arcs: list[int] = []
    value = 0
    at_start = True
    for byte in content:
        if at_start and byte == 0x80:
            raise _ext_error("non-minimal object identifier arc")
        value = (value << 7) | (byte & 0x7F)
        at_start = not byte & 0x80
        if at_start:
            arcs.append(value)
            value = 0
    head = arcs[0]
    first, second = (0, head) if head < 40 else (1, head - 40) if head < 80 else (2, head - 80)
    return ".".join(str(arc) for arc in [first, second, *arcs[1:]])


def _decode_integer(content: bytes, what: str, maximum: int) -> int:
    if not content:
        raise _ext_error(f"{what}: empty INTEGER")
    if len(content) > 1 and (
        (content[0] == 0x00 and content[1] < 0x80) or (content[0] == 0xFF and content[1] >= 0x80)
    ):
        raise _ext_error(f"{what}: non-minimal INTEGER")
    value = int.from_bytes(content, "big", signed=True)
    if not 0 <= value <= maximum:
        raise _ext_error(f"{what}: {value} out of range 0..{maximum}")
    return value


def _oid_map(sequence_content: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """Decode ``SEQUENCE OF SEQUENCE { OID, value }`` into ``{oid: (tag, content)}``."""
    result: dict[str, tuple[int, bytes]] = {}
    for tag, content in _der_items(sequence_content):
        if tag != _TAG_SEQUENCE:
            raise _ext_error(f"{what}: entry is not a SEQUENCE")
        pair = _der_items(content)
        if len(pair) != 2 or pair[0][0] != _TAG_OID:
            raise _ext_error(f"{what}: entry is not {{OID, value}}")
        oid = _decode_oid(pair[0][1])
        if oid in result:
            raise _ext_error(f"{what}: duplicate entry {oid}")
        result[oid] = pair[1]
    return result


def _required(entries: dict[str, tuple[int, bytes]], oid: str, tag: int, what: str) -> bytes:
    if oid not in entries:
        raise _ext_error(f"missing {what} ({oid})")
    found_tag, content = entries[oid]
    if found_tag != tag:
        raise _ext_error(f"{what} has tag {found_tag:#04x}, expected {tag:#04x}")
    return content


def _octets(entries: dict[str, tuple[int, bytes]], oid: str, size: int, what: str) -> bytes:
    content = _required(entries, oid, _TAG_OCTET_STRING, what)
    if len(content) != size:
        raise _ext_error(f"{what} must be {size} bytes, got {len(content)}")
    return content


@dataclass(frozen=True)
class SgxExtension:
    """The platform facts Intel certifies in the PCK leaf (OID 1.2.840.113741.1.13.1)."""

    ppid: bytes
    component_svns: tuple[int, ...]
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int | None


@memoized
def parse_sgx_extension(cert: x509.Certificate) -> SgxExtension:
    """Decode the SGX extension of a PCK certificate."""
    try:
        extension = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise _ext_error("not present") from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise _ext_error("unexpected decoded form")
    entries = _oid_map(_der_single(value.value, _TAG_SEQUENCE, "top level"), "top level")
    tcb = _oid_map(_required(entries, _TCB, _TAG_SEQUENCE, "TCB"), "TCB")
    components = tuple(
        _decode_integer(
            _required(tcb, f"{_TCB}.{n}", _TAG_INTEGER, f"component SVN {n}"),
            f"component SVN {n}",
            0xFF,
        )
        for n in range(1, COMPONENT_COUNT + 1)
    )
    pce_svn = _decode_integer(_required(tcb, _PCESVN, _TAG_INTEGER, "PCESVN"), "PCESVN", 0xFFFF)
    sgx_type: int | None = None
    if _SGX_TYPE in entries:
        sgx_type = _decode_integer(
            _required(entries, _SGX_TYPE, _TAG_ENUMERATED, "SGX type"), "SGX type", 0xFF
        )
    return SgxExtension(
        ppid=_octets(entries, _PPID, 16, "PPID"),
        component_svns=components,
        pce_svn=pce_svn,
        cpu_svn=_octets(tcb, _CPUSVN, 16, "CPUSVN"),
        pce_id=_octets(entries, _PCEID, 2, "PCEID"),
        fmspc=_octets(entries, _FMSPC, 6, "FMSPC"),
        sgx_type=sgx_type,
    )


# --- the PCK chain -----------------------------------------------------------------------


@dataclass(frozen=True)
class PckChain:
    """A verified PCK chain with the leaf's decoded SGX extension."""

    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate
    leaf_public_key: ec.EllipticCurvePublicKey
    sgx: SgxExtension


def p256_public_key(cert: x509.Certificate, label: str) -> ec.EllipticCurvePublicKey:
    """The certificate's key, which must be ECDSA P-256 (the only curve DCAP v3 signs with)."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateChainError(f"{label} key is not ECDSA P-256")
    return key


def verify_pck_chain(
    cert_data: bytes, *, root_public_key: ec.EllipticCurvePublicKey, now: datetime
) -> PckChain:
    """Verify the quote's PEM PCK chain (Intel QVL 4.1.2.4.4 and the chain to the root)."""
    certs = parse_pem_chain(cert_data, "PCK chain")
    if len(certs) != 3:
        raise CertificateChainError(
            f"PCK chain has {len(certs)} certificates, expected 3 (leaf, PCK CA, root)"
        )
    verify_chain_to_root(certs, root_public_key=root_public_key, now=now, what="PCK chain")
    leaf, intermediate, root = certs
    if PCK_LEAF_CN_PHRASE not in common_name(leaf.subject):
        raise CertificateChainError(f'PCK leaf CN does not contain "{PCK_LEAF_CN_PHRASE}"')
    if not any(phrase in common_name(intermediate.subject) for phrase in PCK_CA_CN_PHRASES):
        raise CertificateChainError("PCK chain intermediate is not a PCK Processor/Platform CA")
    return PckChain(
        leaf=leaf,
        intermediate=intermediate,
        root=root,
        leaf_public_key=p256_public_key(leaf, "PCK leaf"),
        sgx=parse_sgx_extension(leaf),
    )
