"""Veil: a confidential-computing gRPC mesh. The one import root of everything it installs.

    from veil import connect, load_policy, load_identity

`connect` verifies the enclave's attestation before anything is sent (`veil.sdk.client`).
The public names below are loaded on first use, so `import veil` imports nothing else: the
enclave, which runs as `python -m veil.enclave.runner`, must not pull the SDK in with it.

Packages: `veil.sdk` (the SDK), `veil.verify` (attestation verification), `veil.cli` (the
`veil` command), `veil.errors` (every error a client sees), `veil.<service>.v1` (generated
messages and stubs), and, for operators, `veil.enclave`, `veil.services` and `veil.dev`
(those need `pip install 'veil[server]'`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veil.sdk.apps import BallotClient, TokenClient, VaultClient, VoteReceipt
    from veil.sdk.client import VeilClient, connect
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
    from veil.sdk.identity import (
        AnonymousIdentity,
        OAuth2Identity,
        SigningIdentity,
        load_identity,
        new_identity,
    )
    from veil.sdk.trust_policy import ExpectedMeasurement, load_policy
    from veil.verify.bundle import VerifiedAttestation, verify_bundle
    from veil.verify.errors import AttestationError

#: Public name -> the module that defines it.
_EXPORTS = {
    "AnonymousIdentity": "veil.sdk.identity",
    "AttestationError": "veil.verify.errors",
    "BallotClient": "veil.sdk.apps",
    "CommandRefused": "veil.sdk.errors",
    "ExpectedMeasurement": "veil.sdk.trust_policy",
    "GatewayError": "veil.sdk.errors",
    "IdentityError": "veil.sdk.errors",
    "IntegrityError": "veil.sdk.errors",
    "OAuth2Identity": "veil.sdk.identity",
    "OutcomeUnknown": "veil.sdk.errors",
    "PolicyError": "veil.sdk.errors",
    "ResultLost": "veil.sdk.errors",
    "SigningIdentity": "veil.sdk.identity",
    "TokenClient": "veil.sdk.apps",
    "VaultClient": "veil.sdk.apps",
    "VeilClient": "veil.sdk.client",
    "VeilClientError": "veil.sdk.errors",
    "VerifiedAttestation": "veil.verify.bundle",
    "VoteReceipt": "veil.sdk.apps",
    "connect": "veil.sdk.client",
    "load_identity": "veil.sdk.identity",
    "load_policy": "veil.sdk.trust_policy",
    "new_identity": "veil.sdk.identity",
    "verify_bundle": "veil.verify.bundle",
}

__all__ = [
    "AnonymousIdentity",
    "AttestationError",
    "BallotClient",
    "CommandRefused",
    "ExpectedMeasurement",
    "GatewayError",
    "IdentityError",
    "IntegrityError",
    "OAuth2Identity",
    "OutcomeUnknown",
    "PolicyError",
    "ResultLost",
    "SigningIdentity",
    "TokenClient",
    "VaultClient",
    "VeilClient",
    "VeilClientError",
    "VerifiedAttestation",
    "VoteReceipt",
    "connect",
    "load_identity",
    "load_policy",
    "new_identity",
    "verify_bundle",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'veil' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
