"""Verify an SGX DCAP v3 quote end to end, in the order of Intel's Quote Verification Library.

1. PCK chain to the pinned root, PCK leaf checks and SGX extension (QVL 4.1.2.4.4).
2. With collateral: CRLs, TCB info and QE identity authenticity, freshness and platform
   match (4.1.2.4.6-4.1.2.4.10).
3. QE report signature by the PCK key (4.1.2.4.12).
4. QE report_data = SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes (4.1.2.4.13).
5. With collateral: QE report against the QE identity (4.1.2.4.14-4.1.2.4.15).
6. Always: QE report against Intel's baseline QE identity (MRSIGNER, ISVPRODID 1, not debug).
7. ISV signature over header ‖ report body by the attestation key (4.1.2.4.16).
8. With collateral: platform TCB level, merged with the QE's TCB status (4.1.2.4.17).

The result says what the enclave is; whether that is acceptable (MRENCLAVE, debug, TCB
status) is the release policy's decision, not this module's.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from veil.verify.collateral import Collateral, TcbResult, check_qe_identity, evaluate_tcb, verify_collateral
from veil.verify.errors import QeIdentityError, QuoteSignatureError
from veil.verify.pck import PckChain, ecdsa_p256_verify, p256_key_from_raw, verify_pck_chain
from veil.verify.quote import Quote, ReportBody, parse_quote

#: Intel's Quoting Enclave (QE3) as Intel's QE identity collateral names it. The PCK key signs
#: the report of any enclave the platform lets request provisioning, so only this identity says
#: the attestation key belongs to Intel's QE; it is checked on every quote, collateral or not.
INTEL_QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
INTEL_QE_ISV_PROD_ID = 1


@dataclass(frozen=True)
class QuoteFacts:
    """What a quote says the enclave is: the report body's identity and, with collateral, the
    platform's TCB status and advisories (``None`` and empty without it). Attestation tokens
    carry exactly these facts (the keyvault's token issuer takes them)."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: bytes
    tcb_status: str | None
    advisory_ids: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """The ``veil attest verify`` output object (byte fields as lowercase hex)."""
        result: dict[str, Any] = {
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "report_data": self.report_data.hex(),
        }
        if self.tcb_status is not None:
            result["tcb_status"] = self.tcb_status
            result["advisory_ids"] = list(self.advisory_ids)
        return result


@dataclass(frozen=True)
class VerifiedQuote(QuoteFacts):
    """The facts a verified quote proves, with the evidence behind them. TCB fields are set
    only when collateral was given."""

    _: KW_ONLY
    quote: Quote = field(repr=False, compare=False)
    pck: PckChain = field(repr=False, compare=False)
    tcb: TcbResult | None = field(default=None, repr=False, compare=False)


def check_intel_qe(qe_report: ReportBody) -> None:
    """Refuse a QE report that is not Intel's production Quoting Enclave (QE3).

    The baseline of Intel's QE identity, held without collateral: collateral adds MISCSELECT,
    the masked ATTRIBUTES and the QE's TCB level (:func:`collateral.check_qe_identity`).
    """
    if qe_report.mr_signer != INTEL_QE_MRSIGNER:
        raise QeIdentityError(
            f"QE report is not Intel's Quoting Enclave: MRSIGNER {qe_report.mr_signer.hex()} is not "
            f"Intel's {INTEL_QE_MRSIGNER.hex()}"
        )
    if qe_report.isv_prod_id != INTEL_QE_ISV_PROD_ID:
        raise QeIdentityError(
            f"QE report is not Intel's Quoting Enclave: ISVPRODID {qe_report.isv_prod_id} is not "
            f"{INTEL_QE_ISV_PROD_ID} (QE3)"
        )
    # A debug QE's memory, and so its attestation key, is readable by the host.
    if qe_report.debug:
        raise QeIdentityError("QE report is from a debug Quoting Enclave (DEBUG attribute set)")


def verify_quote(
    quote_bytes: bytes,
    *,
    root_public_key: ec.EllipticCurvePublicKey,
    collateral: Collateral | None = None,
    now: datetime | None = None,
) -> VerifiedQuote:
    """Verify ``quote_bytes`` against a root pinned by public key; raise ``QuoteError`` if not.

    ``now`` (timezone-aware, default: the current time) is when certificates, CRLs and
    collateral must be valid. Without ``collateral`` the quote's signatures, PCK chain and
    Intel QE identity are verified but revocation and TCB status are not known.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")

    quote = parse_quote(quote_bytes)
    sig = quote.signature_data
    pck = verify_pck_chain(sig.cert_data, root_public_key=root_public_key, now=now)
    verified = (
        verify_collateral(collateral, pck=pck, root_public_key=root_public_key, now=now)
        if collateral is not None
        else None
    )

    if not ecdsa_p256_verify(pck.leaf_public_key, sig.qe_report_signature, sig.qe_report.raw):
        raise QuoteSignatureError("QE report signature does not verify with the PCK key")

    # The QE vouches for the attestation key by hashing it into its own signed report.
    binding = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest()
    if not hmac.compare_digest(sig.qe_report.report_data[:32], binding):
        raise QuoteSignatureError("QE report data does not bind the attestation key and QE auth data")
    if sig.qe_report.report_data[32:] != bytes(32):
        raise QuoteSignatureError("QE report data is not zero after the key binding")

    qe_level = check_qe_identity(verified.qe_identity, sig.qe_report) if verified else None
    check_intel_qe(sig.qe_report)

    attestation_key = p256_key_from_raw(sig.attestation_key)
    if not ecdsa_p256_verify(attestation_key, sig.isv_signature, quote.signed_bytes):
        raise QuoteSignatureError("quote signature does not verify with the attestation key")

    tcb = (
        evaluate_tcb(verified.tcb_info, pck, qe_level)
        if verified is not None and qe_level is not None
        else None
    )
    body = quote.report_body
    return VerifiedQuote(
        mrenclave=body.mr_enclave,
        mrsigner=body.mr_signer,
        isv_prod_id=body.isv_prod_id,
        isv_svn=body.isv_svn,
        debug=body.debug,
        report_data=body.report_data,
        tcb_status=tcb.status if tcb else None,
        advisory_ids=tcb.advisory_ids if tcb else (),
        quote=quote,
        pck=pck,
        tcb=tcb,
    )
