"""Issue DCAP collateral under a root you hold: the dev PKI's sim platform, and test fakes.

Builds the documents :mod:`collateral` verifies, in Intel's formats: TCB info v3, QE identity
v2 (Intel's QE3 identity), both signed as raw ECDSA-P256 over their exact bytes by a TCB
Signing key, and the root CA and PCK CRLs, laid out as the dcap-qvl JSON collateral that
:meth:`collateral.Collateral.from_json` reads. Nothing here is trusted: collateral issued under
any root but Intel's only verifies for a verifier that pins that root (the dev root, a test's).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from veil.verify.verifier import INTEL_QE_ISV_PROD_ID, INTEL_QE_MRSIGNER

#: What Intel's QE identity demands of the QE report: MISCSELECT 0, and of ATTRIBUTES (under a
#: mask that ignores MODE64BIT) INIT and PROVISIONKEY with DEBUG clear.
QE_MISCSELECT, QE_MISCSELECT_MASK = "00000000", "FFFFFFFF"
QE_ATTRIBUTES = "11000000000000000000000000000000"
QE_ATTRIBUTES_MASK = "FBFFFFFFFFFFFFFF0000000000000000"
TCB_EVALUATION_DATA_NUMBER = 17


def sign_raw(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA-P256-SHA256 as raw big-endian ``r ‖ s`` (Intel's signature format)."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def pem(*certs: x509.Certificate) -> bytes:
    """Concatenated PEM certificates, as collateral issuer chains carry them."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def iso(moment: datetime) -> str:
    """An ISO 8601 UTC timestamp to the second, as Intel writes them."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def tcb_level(
    status: str,
    *,
    components: Sequence[int],
    pce_svn: int,
    tcb_date: str,
    advisories: Sequence[str] = (),
) -> dict[str, Any]:
    """One platform TCB level of TCB info v3 (16 component SVNs and a PCESVN)."""
    level: dict[str, Any] = {
        "tcb": {"sgxtcbcomponents": [{"svn": svn} for svn in components], "pcesvn": pce_svn},
        "tcbDate": tcb_date,
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def qe_level(isv_svn: int, status: str, *, tcb_date: str, advisories: Sequence[str] = ()) -> dict[str, Any]:
    """One TCB level of the QE identity, keyed by the QE's ISVSVN."""
    level: dict[str, Any] = {"tcb": {"isvsvn": isv_svn}, "tcbDate": tcb_date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def tcb_info_json(
    *,
    levels: list[dict[str, Any]],
    fmspc: bytes,
    pce_id: bytes,
    issued: datetime,
    next_update: datetime,
    version: int = 3,
    tcb_id: str = "SGX",
) -> str:
    """The signed ``tcbInfo`` document for one platform (FMSPC, PCEID)."""
    return json.dumps(
        {
            "id": tcb_id,
            "version": version,
            "issueDate": iso(issued),
            "nextUpdate": iso(next_update),
            "fmspc": fmspc.hex().upper(),
            "pceId": pce_id.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "tcbLevels": levels,
        },
        separators=(",", ":"),
    )


def qe_identity_json(
    *,
    levels: list[dict[str, Any]],
    issued: datetime,
    next_update: datetime,
    mrsigner: bytes = INTEL_QE_MRSIGNER,
    isv_prod_id: int = INTEL_QE_ISV_PROD_ID,
) -> str:
    """The signed ``enclaveIdentity`` document of Intel's QE3 (or, for tests, another QE)."""
    return json.dumps(
        {
            "id": "QE",
            "version": 2,
            "issueDate": iso(issued),
            "nextUpdate": iso(next_update),
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "miscselect": QE_MISCSELECT,
            "miscselectMask": QE_MISCSELECT_MASK,
            "attributes": QE_ATTRIBUTES,
            "attributesMask": QE_ATTRIBUTES_MASK,
            "mrsigner": mrsigner.hex().upper(),
            "isvprodid": isv_prod_id,
            "tcbLevels": levels,
        },
        separators=(",", ":"),
    )


def make_crl(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    last_update: datetime,
    next_update: datetime,
    revoked: Sequence[x509.Certificate] = (),
) -> bytes:
    """A DER CRL of ``issuer`` revoking ``revoked`` (a day before ``last_update``)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(last_update)
        .next_update(next_update)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(last_update - timedelta(days=1))
            .build()
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def collateral_json(
    *,
    root: x509.Certificate,
    pck_ca: x509.Certificate,
    signer: x509.Certificate,
    signer_key: ec.EllipticCurvePrivateKey,
    tcb_info: str,
    qe_identity: str,
    root_crl: bytes,
    pck_crl: bytes,
) -> dict[str, str]:
    """Collateral in the dcap-qvl JSON layout: ``signer`` (a TCB Signing certificate under
    ``root``) signs the TCB info and QE identity; the CRLs are DER, written as hex."""
    signing_chain = pem(signer, root).decode()
    return {
        "pck_crl_issuer_chain": pem(pck_ca, root).decode(),
        "root_ca_crl": root_crl.hex(),
        "pck_crl": pck_crl.hex(),
        "tcb_info_issuer_chain": signing_chain,
        "tcb_info": tcb_info,
        "tcb_info_signature": sign_raw(signer_key, tcb_info.encode()).hex(),
        "qe_identity_issuer_chain": signing_chain,
        "qe_identity": qe_identity,
        "qe_identity_signature": sign_raw(signer_key, qe_identity.encode()).hex(),
    }
