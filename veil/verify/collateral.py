"""DCAP collateral: TCB info, QE identity and CRLs, verified against the pinned root.

The input is the JSON collateral layout used by Phala's dcap-qvl (and PCCS clients)::

    pck_crl_issuer_chain      PEM   PCK CA ‖ root, issuer of pck_crl
    root_ca_crl               hex   DER CRL of the root (revokes intermediates)
    pck_crl                   hex   DER CRL of the PCK Processor/Platform CA (revokes leaves)
    tcb_info_issuer_chain     PEM   TCB Signing ‖ root
    tcb_info                  str   the signed tcbInfo JSON, byte for byte
    tcb_info_signature        hex   raw r‖s ECDSA-P256-SHA256 over tcb_info
    qe_identity_issuer_chain  PEM   TCB Signing ‖ root
    qe_identity               str   the signed enclaveIdentity JSON, byte for byte
    qe_identity_signature     hex   raw r‖s over qe_identity

:func:`verify_collateral` authenticates all of it and checks it is fresh at ``now`` and
belongs to the quote's platform; :func:`check_qe_identity`, :func:`select_tcb_level` and
:func:`merge_tcb_status` then evaluate the quote against it following Intel's QVL
(steps 4.1.2.4.6-4.1.2.4.17 of ``QuoteVerifier.cpp``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from veil.enclave import wire
from veil.verify.errors import CertificateChainError, CollateralError, CollateralExpiredError, RevokedError
from veil.verify.pck import (
    DECODE_ERRORS,
    PckChain,
    common_name,
    ecdsa_p256_verify,
    memoized,
    p256_public_key,
    parse_pem_chain,
    same_public_key,
    verify_chain_to_root,
)
from veil.verify.quote import ReportBody

TCB_SIGNING_CN_PHRASE = "SGX TCB Signing"
TCB_INFO_ID_SGX = "SGX"
TCB_INFO_VERSION = 3
QE_IDENTITY_ID = "QE"
QE_IDENTITY_VERSION = 2

UP_TO_DATE = "UpToDate"
SW_HARDENING_NEEDED = "SWHardeningNeeded"
CONFIGURATION_NEEDED = "ConfigurationNeeded"
CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"

TCB_STATUSES = frozenset(
    {
        UP_TO_DATE,
        SW_HARDENING_NEEDED,
        CONFIGURATION_NEEDED,
        CONFIGURATION_AND_SW_HARDENING_NEEDED,
        OUT_OF_DATE,
        OUT_OF_DATE_CONFIGURATION_NEEDED,
        REVOKED,
    }
)
QE_TCB_STATUSES = frozenset({UP_TO_DATE, OUT_OF_DATE, REVOKED})

_COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


# --- strict JSON -------------------------------------------------------------------------


def _load_json(text: bytes, what: str) -> dict[str, Any]:
    """Parse JSON refusing duplicate keys and NaN/Infinity: one document, one meaning."""
    return wire.strict_json_object(text, what, CollateralError)


def _field(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in obj:
        raise CollateralError(f"{what}: missing {key!r}")
    value = obj[key]
    # bool is an int subclass in Python; JSON true is never a number here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CollateralError(f"{what}: {key!r} must be {kind.__name__}")
    return value


def _hex_field(obj: dict[str, Any], key: str, size: int, what: str) -> bytes:
    text: str = _field(obj, key, str, what)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise CollateralError(f"{what}: {key!r} is not hex") from None
    if len(value) != size:
        raise CollateralError(f"{what}: {key!r} must be {size} bytes, got {len(value)}")
    return value


def _date_field(obj: dict[str, Any], key: str, what: str) -> datetime:
    text: str = _field(obj, key, str, what)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CollateralError(f"{what}: {key!r} is not an ISO 8601 date") from None
    if value.tzinfo is None:
        raise CollateralError(f"{what}: {key!r} has no time zone")
    return value


def _advisories(obj: dict[str, Any], what: str) -> tuple[str, ...]:
    if "advisoryIDs" not in obj:
        return ()
    ids: list[Any] = _field(obj, "advisoryIDs", list, what)
    if not all(isinstance(item, str) for item in ids):
        raise CollateralError(f"{what}: advisoryIDs must be strings")
    return tuple(ids)


def _check_fresh(issued: datetime, next_update: datetime, now: datetime, what: str) -> None:
    if now < issued:
        raise CollateralExpiredError(
            f"{what} is not yet valid at {now.isoformat()} (issued {issued.isoformat()})"
        )
    if now > next_update:
        raise CollateralExpiredError(
            f"{what} expired: nextUpdate {next_update.isoformat()} is before {now.isoformat()}"
        )


# --- raw collateral ----------------------------------------------------------------------


@dataclass(frozen=True)
class Collateral:
    """Unverified collateral as fetched; signed documents are kept as their exact bytes."""

    pck_crl_issuer_chain: bytes
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: bytes
    tcb_info: bytes
    tcb_info_signature: bytes
    qe_identity_issuer_chain: bytes
    qe_identity: bytes
    qe_identity_signature: bytes

    @classmethod
    def from_json(cls, text: str | bytes) -> Collateral:
        """Read the dcap-qvl JSON collateral format (CRLs as hex DER or PEM)."""
        raw = text.encode() if isinstance(text, str) else text
        obj = _load_json(raw, "collateral")
        values = {key: _field(obj, key, str, "collateral") for key in _COLLATERAL_FIELDS}
        return cls(
            pck_crl_issuer_chain=values["pck_crl_issuer_chain"].encode(),
            root_ca_crl=_crl_bytes(values["root_ca_crl"], "root_ca_crl"),
            pck_crl=_crl_bytes(values["pck_crl"], "pck_crl"),
            tcb_info_issuer_chain=values["tcb_info_issuer_chain"].encode(),
            tcb_info=values["tcb_info"].encode(),
            tcb_info_signature=_hex_field(values, "tcb_info_signature", 64, "collateral"),
            qe_identity_issuer_chain=values["qe_identity_issuer_chain"].encode(),
            qe_identity=values["qe_identity"].encode(),
            qe_identity_signature=_hex_field(values, "qe_identity_signature", 64, "collateral"),
        )


def load_collateral(path: Path) -> Collateral:
    """Read collateral JSON from a file."""
    return Collateral.from_json(path.read_bytes())


def _crl_bytes(text: str, key: str) -> bytes:
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CollateralError(f"collateral: {key!r} is neither hex DER nor PEM") from None


@memoized
def _load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        # Names, entries and extensions decode lazily: decode them now so a malformed CRL
        # is a refusal here, not an exception during the checks.
        _ = (crl.issuer, crl.extensions, crl.last_update_utc, crl.next_update_utc)
        _ = [(entry.serial_number, entry.extensions) for entry in crl]
    except DECODE_ERRORS:
        raise CollateralError(f"{what}: not a valid CRL") from None
    return crl


# --- parsed documents --------------------------------------------------------------------


@dataclass(frozen=True)
class _Level:
    """What every TCB level of Intel's signed documents states."""

    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TcbLevel(_Level):
    """One platform TCB level of TCB info v3."""

    component_svns: tuple[int, ...]
    pce_svn: int


@dataclass(frozen=True)
class QeTcbLevel(_Level):
    """One TCB level of the QE identity, keyed by the QE's ISVSVN."""

    isv_svn: int


@dataclass(frozen=True)
class _Document:
    """What both of Intel's signed TCB documents state about themselves."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int


@dataclass(frozen=True)
class TcbInfo(_Document):
    """Intel TCB info v3 for one FMSPC (SGX)."""

    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeIdentity(_Document):
    """Intel QE identity v2: what a genuine Quoting Enclave's report looks like."""

    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mr_signer: bytes
    isv_prod_id: int
    levels: tuple[QeTcbLevel, ...]


def _document(
    data: bytes, what: str, kind: str, expected_id: str, expected_version: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A signed TCB document's JSON object (only `kind` of the expected id and version) and its
    `_Document` fields."""
    obj = _load_json(data, what)
    document_id: str = _field(obj, "id", str, what)
    version: int = _field(obj, "version", int, what)
    if document_id != expected_id or version != expected_version:
        raise CollateralError(
            f"{what}: id {document_id!r} version {version} is not {kind} version {expected_version}"
        )
    return obj, {
        "id": document_id,
        "version": version,
        "issue_date": _date_field(obj, "issueDate", what),
        "next_update": _date_field(obj, "nextUpdate", what),
        "tcb_evaluation_data_number": _field(obj, "tcbEvaluationDataNumber", int, what),
    }


_L = TypeVar("_L", bound=_Level)


def _levels(obj: dict[str, Any], what: str, parse: Callable[[dict[str, Any]], _L]) -> list[_L]:
    """Every entry of a document's ``tcbLevels``, parsed; refused when there is none."""
    levels = []
    for raw in _field(obj, "tcbLevels", list, what):
        if not isinstance(raw, dict):
            raise CollateralError(f"{what}: tcbLevels entry is not an object")
        levels.append(parse(raw))
    if not levels:
        raise CollateralError(f"{what}: no tcbLevels")
    return levels


def _level(obj: dict[str, Any], statuses: Collection[str], what: str) -> dict[str, Any]:
    """The `_Level` fields of one TCB level; an unknown status is refused."""
    status: str = _field(obj, "tcbStatus", str, what)
    if status not in statuses:
        raise CollateralError(f"{what}: unknown tcbStatus {status!r}")
    return {
        "tcb_date": _field(obj, "tcbDate", str, what),
        "status": status,
        "advisory_ids": _advisories(obj, what),
    }


@memoized
def parse_tcb_info(data: bytes) -> TcbInfo:
    """Parse signed TCB info JSON (the ``tcbInfo`` object); accepts only SGX v3."""
    what = "TCB info"
    obj, document = _document(data, what, "SGX TCB info", TCB_INFO_ID_SGX, TCB_INFO_VERSION)
    tcb_type: int = _field(obj, "tcbType", int, what)
    if tcb_type != 0:
        raise CollateralError(f"{what}: unsupported tcbType {tcb_type}")
    levels = _levels(obj, what, _parse_tcb_level)
    # QVL evaluates levels in descending TCB order; Intel already lists them that way, and
    # the stable sort keeps its order among equal levels.
    levels.sort(key=lambda level: (level.component_svns, level.pce_svn), reverse=True)
    return TcbInfo(
        **document,
        fmspc=_hex_field(obj, "fmspc", 6, what),
        pce_id=_hex_field(obj, "pceId", 2, what),
        tcb_type=tcb_type,
        levels=tuple(levels),
    )


def _parse_tcb_level(obj: dict[str, Any]) -> TcbLevel:
    what = "TCB info level"
    tcb = _field(obj, "tcb", dict, what)
    components = _field(tcb, "sgxtcbcomponents", list, what)
    if len(components) != 16:
        raise CollateralError(f"{what}: expected 16 sgxtcbcomponents, got {len(components)}")
    svns = []
    for component in components:
        if not isinstance(component, dict):
            raise CollateralError(f"{what}: sgxtcbcomponents entry is not an object")
        svns.append(_field(component, "svn", int, what))
    return TcbLevel(
        **_level(obj, TCB_STATUSES, what),
        component_svns=tuple(svns),
        pce_svn=_field(tcb, "pcesvn", int, what),
    )


def _parse_qe_level(obj: dict[str, Any]) -> QeTcbLevel:
    what = "QE identity level"
    isv_svn = _field(_field(obj, "tcb", dict, what), "isvsvn", int, what)
    return QeTcbLevel(**_level(obj, QE_TCB_STATUSES, what), isv_svn=isv_svn)


@memoized
def parse_qe_identity(data: bytes) -> QeIdentity:
    """Parse signed QE identity JSON (the ``enclaveIdentity`` object); accepts only QE v2."""
    what = "QE identity"
    obj, document = _document(data, what, "QE identity", QE_IDENTITY_ID, QE_IDENTITY_VERSION)
    levels = _levels(obj, what, _parse_qe_level)
    levels.sort(key=lambda level: level.isv_svn, reverse=True)
    return QeIdentity(
        **document,
        miscselect=_hex_field(obj, "miscselect", 4, what),
        miscselect_mask=_hex_field(obj, "miscselectMask", 4, what),
        attributes=_hex_field(obj, "attributes", 16, what),
        attributes_mask=_hex_field(obj, "attributesMask", 16, what),
        mr_signer=_hex_field(obj, "mrsigner", 32, what),
        isv_prod_id=_field(obj, "isvprodid", int, what),
        levels=tuple(levels),
    )


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedCollateral:
    """Collateral whose signatures, chains, CRLs and freshness have been checked."""

    tcb_info: TcbInfo
    qe_identity: QeIdentity


def _check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePublicKey,
    now: datetime,
    what: str,
) -> None:
    # QVL compares the raw issuer names (4.1.2.4.6): a CRL of another CA proves nothing.
    if crl.issuer.public_bytes() != issuer.subject.public_bytes():
        raise CollateralError(
            f"{what} issuer {crl.issuer.rfc4514_string()} is not {issuer.subject.rfc4514_string()}"
        )
    try:
        valid = crl.is_signature_valid(issuer_key)
    except DECODE_ERRORS:
        valid = False
    if not valid:
        raise CollateralError(f"{what} signature does not verify")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CollateralError(f"{what} has no nextUpdate")
    _check_fresh(crl.last_update_utc, next_update, now, what)


def _check_not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, what: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise RevokedError(f"{what} ({common_name(cert.subject)}) is revoked")


def _verify_signing_chain(
    pem: bytes,
    root_crl: x509.CertificateRevocationList,
    *,
    root_public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    what: str,
) -> ec.EllipticCurvePublicKey:
    """Verify a ``TCB Signing ‖ root`` chain and return the signing key."""
    certs = parse_pem_chain(pem, what, CollateralError)
    if len(certs) != 2:
        raise CollateralError(f"{what}: expected 2 certificates (TCB Signing, root)")
    verify_chain_to_root(certs, root_public_key=root_public_key, now=now, what=what, error=CollateralError)
    signer = certs[0]
    if TCB_SIGNING_CN_PHRASE not in common_name(signer.subject):
        raise CollateralError(f'{what}: signer CN does not contain "{TCB_SIGNING_CN_PHRASE}"')
    _check_not_revoked(root_crl, signer, f"{what} signer")
    try:
        return p256_public_key(signer, f"{what} signer")
    except CertificateChainError as exc:
        raise CollateralError(exc.reason) from None


_D = TypeVar("_D", bound=_Document)


def _signed_document(
    data: bytes,
    signature: bytes,
    issuer_chain: bytes,
    parse: Callable[[bytes], _D],
    root_crl: x509.CertificateRevocationList,
    *,
    root_public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    what: str,
) -> _D:
    """One of Intel's signed TCB documents: its issuer chain verified (to the pinned root, not
    revoked), its signature over `data` verified, then parsed and checked fresh."""
    key = _verify_signing_chain(
        issuer_chain, root_crl, root_public_key=root_public_key, now=now, what=f"{what} issuer chain"
    )
    if not ecdsa_p256_verify(key, signature, data):
        raise CollateralError(f"{what} signature does not verify")
    document = parse(data)
    _check_fresh(document.issue_date, document.next_update, now, what)
    return document


def verify_collateral(
    collateral: Collateral,
    *,
    pck: PckChain,
    root_public_key: ec.EllipticCurvePublicKey,
    now: datetime,
) -> VerifiedCollateral:
    """Authenticate collateral for the quote's verified PCK chain at ``now``.

    Checks, in QVL order: root CA CRL (signed by the root, fresh) does not revoke the PCK CA;
    the PCK CRL is issued and signed by the leaf's issuer, fresh, and does not revoke the
    leaf; TCB info and QE identity are signed by a TCB Signing certificate of the pinned
    root over their exact bytes, fresh, of the supported kind, and TCB info is for this
    platform's FMSPC and PCEID.
    """
    root_crl = _load_crl(collateral.root_ca_crl, "root CA CRL")
    _check_crl(root_crl, pck.root, root_public_key, now, "root CA CRL")
    _check_not_revoked(root_crl, pck.intermediate, "PCK CA certificate")

    crl_chain = parse_pem_chain(collateral.pck_crl_issuer_chain, "PCK CRL issuer chain", CollateralError)
    verify_chain_to_root(
        crl_chain,
        root_public_key=root_public_key,
        now=now,
        what="PCK CRL issuer chain",
        error=CollateralError,
        leaf_is_ca=True,
    )
    crl_issuer = crl_chain[0]
    pck_ca_key = p256_public_key(pck.intermediate, "PCK CA")
    if crl_issuer.subject != pck.intermediate.subject or not same_public_key(
        crl_issuer.public_key(), pck_ca_key
    ):
        raise CollateralError("PCK CRL issuer chain is not for the quote's PCK CA")
    pck_crl = _load_crl(collateral.pck_crl, "PCK CRL")
    if pck_crl.issuer.public_bytes() != pck.leaf.issuer.public_bytes():
        raise CollateralError("PCK CRL issuer is not the PCK certificate's issuer")
    _check_crl(pck_crl, pck.intermediate, pck_ca_key, now, "PCK CRL")
    _check_not_revoked(pck_crl, pck.leaf, "PCK certificate")

    tcb_info = _signed_document(
        collateral.tcb_info,
        collateral.tcb_info_signature,
        collateral.tcb_info_issuer_chain,
        parse_tcb_info,
        root_crl,
        root_public_key=root_public_key,
        now=now,
        what="TCB info",
    )
    # 4.1.2.4.10: the TCB info must describe this very platform.
    if tcb_info.fmspc != pck.sgx.fmspc:
        raise CollateralError(
            f"TCB info FMSPC {tcb_info.fmspc.hex()} does not match the PCK certificate's "
            f"{pck.sgx.fmspc.hex()}"
        )
    if tcb_info.pce_id != pck.sgx.pce_id:
        raise CollateralError(
            f"TCB info PCEID {tcb_info.pce_id.hex()} does not match the PCK certificate's "
            f"{pck.sgx.pce_id.hex()}"
        )

    qe_identity = _signed_document(
        collateral.qe_identity,
        collateral.qe_identity_signature,
        collateral.qe_identity_issuer_chain,
        parse_qe_identity,
        root_crl,
        root_public_key=root_public_key,
        now=now,
        what="QE identity",
    )
    return VerifiedCollateral(tcb_info=tcb_info, qe_identity=qe_identity)


# --- evaluation --------------------------------------------------------------------------


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=True))


def check_qe_identity(identity: QeIdentity, qe_report: ReportBody) -> QeTcbLevel:
    """Match the (signature-verified) QE report to the QE identity; return its TCB level.

    Mismatches of MISCSELECT, ATTRIBUTES (under the masks), MRSIGNER or ISVPRODID refuse the
    quote (QVL 4.1.2.9.5-8). The level is the first, in descending ISVSVN order, that the
    QE's ISVSVN reaches; an ISVSVN below every level is not supported.
    """
    # Compare the raw little-endian report bytes: the identity's hex strings are those bytes.
    if _masked(qe_report.raw[16:20], identity.miscselect_mask) != identity.miscselect:
        raise CollateralError("QE identity mismatch: MISCSELECT")
    if _masked(qe_report.attributes, identity.attributes_mask) != identity.attributes:
        raise CollateralError("QE identity mismatch: ATTRIBUTES")
    if qe_report.mr_signer != identity.mr_signer:
        raise CollateralError(
            f"QE identity mismatch: MRSIGNER {qe_report.mr_signer.hex()} is not {identity.mr_signer.hex()}"
        )
    if qe_report.isv_prod_id != identity.isv_prod_id:
        raise CollateralError(
            f"QE identity mismatch: ISVPRODID {qe_report.isv_prod_id} is not {identity.isv_prod_id}"
        )
    for level in identity.levels:
        if qe_report.isv_svn >= level.isv_svn:
            return level
    raise CollateralError(f"QE ISVSVN {qe_report.isv_svn} is below every QE identity TCB level")


def select_tcb_level(tcb_info: TcbInfo, pck: PckChain) -> TcbLevel:
    """First level (descending) whose 16 component SVNs and PCESVN the platform all reaches."""
    platform = pck.sgx
    for level in tcb_info.levels:
        if platform.pce_svn >= level.pce_svn and all(
            have >= need for have, need in zip(platform.component_svns, level.component_svns, strict=True)
        ):
            return level
    raise CollateralError("platform TCB is below every TCB level (TCB not supported)")


def merge_tcb_status(tcb_status: str, qe_status: str) -> str:
    """Converge the platform TCB status with the QE's, as QVL's convergeTcbStatusWithQeTcbStatus.

    An out-of-date QE makes an otherwise current platform OutOfDate (keeping a pending
    configuration need); a revoked QE revokes the result.
    """
    if qe_status == REVOKED:
        return REVOKED
    if qe_status == OUT_OF_DATE:
        if tcb_status in (UP_TO_DATE, SW_HARDENING_NEEDED):
            return OUT_OF_DATE
        if tcb_status in (CONFIGURATION_NEEDED, CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return OUT_OF_DATE_CONFIGURATION_NEEDED
    return tcb_status


@dataclass(frozen=True)
class TcbResult:
    """The final TCB verdict for a quote."""

    status: str
    advisory_ids: tuple[str, ...]
    tcb_level: TcbLevel
    qe_tcb_level: QeTcbLevel


def evaluate_tcb(tcb_info: TcbInfo, pck: PckChain, qe_level: QeTcbLevel) -> TcbResult:
    """Select the platform TCB level, merge the QE status, and refuse a Revoked result.

    Advisory IDs are those of the platform level followed by any new ones of the QE level.
    """
    level = select_tcb_level(tcb_info, pck)
    status = merge_tcb_status(level.status, qe_level.status)
    if status == REVOKED:
        source = "QE" if qe_level.status == REVOKED else "platform"
        raise RevokedError(f"TCB status is Revoked ({source} TCB level)")
    advisories = tuple(dict.fromkeys(level.advisory_ids + qe_level.advisory_ids))
    return TcbResult(status=status, advisory_ids=advisories, tcb_level=level, qe_tcb_level=qe_level)
