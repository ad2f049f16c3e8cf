"""Every error a Veil client sees, in one place.

`VeilClientError` is the base of everything the SDK raises (its subclasses name one kind
each). Refused evidence is the verification library's own family: `AttestationError` and its
subclasses (a quote, its collateral, a token, a report-data binding); nothing is ever sent to
an enclave that raised one. Catch both to catch every failure:

    try:
        ...
    except (veil.errors.VeilClientError, veil.errors.AttestationError) as error:
        ...
"""

from __future__ import annotations

from veil.sdk.errors import (
    CommandRefused,
    GatewayError,
    IdentityError,
    IntegrityError,
    OutcomeUnknown,
    PolicyError,
    ResultLost,
    VeilClientError,
)
from veil.verify.errors import (
    AttestationError,
    BindingError,
    CertificateChainError,
    CollateralError,
    CollateralExpiredError,
    QeIdentityError,
    QuoteError,
    QuoteFormatError,
    QuoteSignatureError,
    RevokedError,
    TokenError,
)

__all__ = [
    "AttestationError",
    "BindingError",
    "CertificateChainError",
    "CollateralError",
    "CollateralExpiredError",
    "CommandRefused",
    "GatewayError",
    "IdentityError",
    "IntegrityError",
    "OutcomeUnknown",
    "PolicyError",
    "QeIdentityError",
    "QuoteError",
    "QuoteFormatError",
    "QuoteSignatureError",
    "ResultLost",
    "RevokedError",
    "TokenError",
    "VeilClientError",
]
