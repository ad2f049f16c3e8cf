"""The Python SDK and the `veil` command line.

    from client import connect, load_policy, load_identity

`connect` verifies the enclave's attestation before anything is sent; see client.sdk.
"""

from __future__ import annotations

from client.apps import BallotClient, TokenClient, VaultClient, VoteReceipt
from client.errors import (
    CommandRefused,
    GatewayError,
    IdentityError,
    IntegrityError,
    PolicyError,
    VeilClientError,
)
from client.identity import AnonymousIdentity, OAuth2Identity, SigningIdentity, load_identity, new_identity
from client.policy import ExpectedMeasurement, dev_policy, load_policy, write_dev_policy
from client.sdk import VeilClient, connect
from veil.verify.bundle import VerifiedAttestation, verify_bundle
from veil.verify.errors import AttestationError

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
    "PolicyError",
    "SigningIdentity",
    "TokenClient",
    "VaultClient",
    "VeilClient",
    "VeilClientError",
    "VerifiedAttestation",
    "VoteReceipt",
    "connect",
    "dev_policy",
    "load_identity",
    "load_policy",
    "new_identity",
    "verify_bundle",
    "write_dev_policy",
]
