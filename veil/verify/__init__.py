"""The verification library: evidence in, a verdict out; shared by the keyvault and the SDK.

Pure Python over ``cryptography`` and ``pyjwt``, a leaf: it imports no service, SDK or CLI code
(tests/test_layering.py). ``quote`` parses Intel SGX DCAP ECDSA quotes v3, ``pck`` checks the
PCK certificate chain against a root pinned by public key, ``collateral`` checks Intel's signed
TCB info, QE identity and CRLs, and ``verifier`` runs the Intel QVL order over all of them;
``roots`` knows the Intel root and the dev root. ``tokens`` verifies the keyvault's attestation
tokens, ``binding`` the report data that binds an enclave's keys, and ``bundle`` a whole
attestation bundle against a client's trust policy. Every refusal is an
:class:`~veil.verify.errors.AttestationError` (``errors``).
"""

from __future__ import annotations

from veil.verify import errors
from veil.verify.bundle import TrustPolicy, VerifiedAttestation, VerifiedDescriptor, verify_bundle
from veil.verify.errors import *  # noqa: F403
from veil.verify.quote import Quote, ReportBody, parse_quote
from veil.verify.tokens import VerifiedToken, verify_token
from veil.verify.verifier import VerifiedQuote, verify_quote

__all__ = [
    "Quote",
    "ReportBody",
    "TrustPolicy",
    "VerifiedAttestation",
    "VerifiedDescriptor",
    "VerifiedQuote",
    "VerifiedToken",
    "parse_quote",
    "verify_bundle",
    "verify_quote",
    "verify_token",
]
__all__ += errors.__all__  # the AttestationError family
