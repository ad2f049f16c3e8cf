"""What the verification library raises: one family, every member an `AttestationError`.

Each refusal carries ``reason``, a plain-words sentence naming the check that failed (safe to
show: evidence is public); ``str(error)`` is ``"attestation refused: <reason>"``. Callers that
must report a refusal in their own terms (the keyvault's status codes) catch the family here
and translate it once.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "BindingError",
    "CertificateChainError",
    "CollateralError",
    "CollateralExpiredError",
    "QeIdentityError",
    "QuoteError",
    "QuoteFormatError",
    "QuoteSignatureError",
    "RevokedError",
    "TokenError",
]


class AttestationError(Exception):
    """Evidence was refused (a quote, its collateral, a token, a binding or a whole bundle)."""

    #: Set by a client when the refusal came after a command of a call was sent (a re-attestation
    #: while resuming it): that call's request id, which resumes it (the SDK keeps the call).
    request_id: str | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(f"attestation refused: {reason}")
        self.reason = reason


# --- quotes and collateral (DCAP) ----------------------------------------------------------


class QuoteError(AttestationError):
    """A quote (or its collateral) was refused."""


class QuoteFormatError(QuoteError):
    """The bytes are not a well-formed, supported DCAP v3 quote."""


class CertificateChainError(QuoteError):
    """A certificate chain does not lead to the pinned root, or a certificate is unusable."""


class QuoteSignatureError(QuoteError):
    """A signature or a hash binding inside the quote does not verify."""


class QeIdentityError(QuoteError):
    """The QE report is not that of Intel's production Quoting Enclave (MRSIGNER, ISVPRODID, DEBUG)."""


class CollateralError(QuoteError):
    """Collateral (TCB info, QE identity, CRLs) is malformed, unsigned or does not match."""


class CollateralExpiredError(CollateralError):
    """Collateral or a CRL is outside its issueDate..nextUpdate window at the given time."""


class RevokedError(QuoteError):
    """A certificate is revoked by a CRL, or the platform/QE TCB level is Revoked."""


# --- tokens and bindings ---------------------------------------------------------------------


class TokenError(AttestationError):
    """An attestation token is invalid: signature, algorithm, kid, issuer, lifetime or claims."""


class BindingError(AttestationError):
    """Report data does not bind what it claims to (the runtime data and the nonce)."""
