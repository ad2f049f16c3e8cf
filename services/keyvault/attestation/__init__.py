"""Intel SGX DCAP ECDSA quote v3 verification for the keyvault.

Pure Python over ``cryptography``: ``quote`` parses the byte format, ``pck`` checks the
PCK certificate chain against a root pinned by public key, ``collateral`` checks Intel's
signed TCB info, QE identity and CRLs, and ``verifier`` runs the Intel QVL order over all
of them. ``roots`` knows the Intel root and the dev root; ``cli`` is ``veil attest verify``.
"""

from __future__ import annotations

from veil.services.keyvault.attestation.quote import (
    CertificateChainError,
    CollateralError,
    CollateralExpiredError,
    QeIdentityError,
    Quote,
    QuoteError,
    QuoteFormatError,
    QuoteSignatureError,
    ReportBody,
    RevokedError,
    parse_quote,
)
from veil.services.keyvault.attestation.verifier import VerifiedQuote, verify_quote

__all__ = [
    "CertificateChainError",
    "CollateralError",
    "CollateralExpiredError",
    "QeIdentityError",
    "Quote",
    "QuoteError",
    "QuoteFormatError",
    "QuoteSignatureError",
    "ReportBody",
    "RevokedError",
    "VerifiedQuote",
    "parse_quote",
    "verify_quote",
]
