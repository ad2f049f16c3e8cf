"""Authorization inside the enclave: who sent a command, per the instance's AuthScheme.

`none`: the caller names any account (no proof; for demos and open data).
`signature`: an Ed25519 signature over `wire.command_signing_bytes`; the account is the key's hex.
`oauth2`: a JWT from the instance's issuer and audience, verified against the JWKS fixed at
creation, expiry and not-before checked against the host's clock; the account is `sub`.

Replay and reordering protection (the per-account counter) is enforced by the instance, the
same way for every scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.enclave import wire
from veil.enclave.errors import INVALID_ARGUMENT, UNAUTHENTICATED, EnclaveError
from veil.enclave.jwt import JwksVerifier, JwtError, JwtTimeError
from veil.enclave.v1 import command_pb2, envelope_pb2

MAX_ACCOUNT_SIZE = 256


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `signer_public_key` is set only under the signature scheme."""

    account: str
    signer_public_key: bytes = b""


class Authorizer(Protocol):
    """Checks a command's identity proof."""

    def authorize(self, command: command_pb2.Command, now_ms: int) -> Caller:
        """The caller, or raise EnclaveError(UNAUTHENTICATED)."""
        ...


def _unauthenticated(reason: str, *, may_run_later: bool = False) -> EnclaveError:
    return EnclaveError(UNAUTHENTICATED, reason, may_run_later=may_run_later)


def _proof(command: command_pb2.Command, kind: str) -> None:
    if command.auth.WhichOneof("proof") != kind:
        raise _unauthenticated(f"this instance requires a {kind} proof")


class _NoAuth:
    def authorize(self, command: command_pb2.Command, now_ms: int) -> Caller:
        _proof(command, "anonymous")
        account = command.auth.anonymous.account
        if not 0 < len(account.encode("utf-8")) <= MAX_ACCOUNT_SIZE:
            raise _unauthenticated("account name must be 1 to 256 bytes")
        return Caller(account=account)


class _SignatureAuth:
    def authorize(self, command: command_pb2.Command, now_ms: int) -> Caller:
        _proof(command, "signature")
        proof = command.auth.signature
        message = wire.command_proof_bytes(command)
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(proof.public_key).verify(proof.signature, message)
        except (ValueError, InvalidSignature):
            raise _unauthenticated("signature invalid") from None
        return Caller(account=proof.public_key.hex(), signer_public_key=bytes(proof.public_key))


class _OAuth2Auth:
    def __init__(self, config: envelope_pb2.InstanceConfig) -> None:
        try:
            self._verifier = JwksVerifier(
                config.oauth2_jwks_json, issuer=config.oauth2_issuer, audience=config.oauth2_audience
            )
        except JwtError as error:
            raise EnclaveError(INVALID_ARGUMENT, f"oauth2 configuration: {error}") from None

    def authorize(self, command: command_pb2.Command, now_ms: int) -> Caller:
        _proof(command, "oauth2")
        try:
            sub = self._verifier.verify(command.auth.oauth2.jwt, now_ms)
        except JwtError as error:  # the host's clock decides expiry: a later time may accept it
            raise _unauthenticated(str(error), may_run_later=isinstance(error, JwtTimeError)) from None
        if len(sub.encode("utf-8")) > MAX_ACCOUNT_SIZE:
            raise _unauthenticated("token subject too long")
        return Caller(account=sub)


def make_authorizer(config: envelope_pb2.InstanceConfig) -> Authorizer:
    """The authorizer for an instance; INVALID_ARGUMENT for an unusable configuration."""
    if config.auth_scheme == envelope_pb2.AUTH_SCHEME_NONE:
        return _NoAuth()
    if config.auth_scheme == envelope_pb2.AUTH_SCHEME_SIGNATURE:
        return _SignatureAuth()
    if config.auth_scheme == envelope_pb2.AUTH_SCHEME_OAUTH2:
        return _OAuth2Auth(config)
    raise EnclaveError(INVALID_ARGUMENT, "auth_scheme must be NONE, SIGNATURE or OAUTH2")
