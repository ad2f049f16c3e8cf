"""Keyvault domain errors raised by the libraries (policy, tokens, KEK, keys, heads, audit, store).

Each error carries a stable machine ``reason`` (UPPER_SNAKE_CASE, in the style of
``google.rpc.ErrorInfo.reason``) and a message that is safe to show to an authenticated
caller: it never contains key material, KEK details or stack traces. The gRPC layer
(``service.py``) maps these to the shared errors in ``services/common/errors.py``.
"""

from __future__ import annotations

from typing import ClassVar


class KeyvaultError(Exception):
    """Base class: every refusal or failure of the keyvault libraries."""

    default_reason: ClassVar[str] = "KEYVAULT_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason
        self.message = message


class InvalidArgumentError(KeyvaultError):
    """A request field is malformed (bad key name, bad hash length, ...)."""

    default_reason = "INVALID_ARGUMENT"


class ReleasePolicyError(InvalidArgumentError):
    """A release policy does not parse under the strict grammar."""

    default_reason = "INVALID_POLICY"


class TokenRefusedError(KeyvaultError):
    """An attestation token is invalid: signature, algorithm, kid, issuer, lifetime or claims.

    The keyvault's report of a :class:`veil.verify.errors.TokenError`, with a status reason.
    """

    default_reason = "INVALID_TOKEN"


class TokenReplayError(TokenRefusedError):
    """The token's ``jti`` was already used for a key release."""

    default_reason = "TOKEN_REPLAYED"


class AttestationRefusedError(KeyvaultError):
    """Evidence was refused: a quote that does not verify, report data that does not bind the
    runtime data and nonce, or runtime data that is not the enclave's keys.

    The keyvault's report of a :class:`veil.verify.errors.AttestationError`, with a status reason.
    """

    default_reason = "ATTESTATION_REFUSED"


class DecryptionError(KeyvaultError):
    """The one opaque error for every unwrap/decrypt failure (tamper, wrong AAD, wrong key)."""

    default_reason = "DECRYPTION_FAILED"

    def __init__(self) -> None:
        # Deliberately no detail: which check failed is itself an oracle.
        super().__init__("decryption failed")


class KekError(KeyvaultError):
    """The KEK provider is unusable (missing file, bad permissions, HSM key attributes)."""

    default_reason = "KEK_UNAVAILABLE"


class KeyNotFoundError(KeyvaultError):
    """No key (or key version) by that name."""

    default_reason = "KEY_NOT_FOUND"


class KeyExistsError(KeyvaultError):
    """A key by that name exists (or existed: destroyed names are not reused)."""

    default_reason = "KEY_EXISTS"


class KeyDestroyedError(KeyvaultError):
    """The key was crypto-shredded; nothing can be released or rotated."""

    default_reason = "KEY_DESTROYED"


class ReleaseRefusedError(KeyvaultError):
    """The token's claims do not satisfy the key's release policy."""

    default_reason = "RELEASE_POLICY_NOT_SATISFIED"


class CallerNotAllowedError(KeyvaultError):
    """The caller's identity may not name this key (the state host creates instance keys only)."""

    default_reason = "KEY_NAME_NOT_ALLOWED"


class IdempotencyConflictError(KeyvaultError):
    """A request_id was reused for a different operation or different parameters."""

    default_reason = "REQUEST_ID_REUSED"


class HeadRefusedError(KeyvaultError):
    """A commit-head advance was refused (rollback, fork, bad signature, bad key)."""

    default_reason = "COMMIT_HEAD_REFUSED"


class AuditChainError(KeyvaultError):
    """The audit log's hash chain does not verify."""

    default_reason = "AUDIT_CHAIN_BROKEN"

    def __init__(self, message: str, *, sequence: int) -> None:
        super().__init__(message)
        self.sequence = sequence


class StoreError(KeyvaultError):
    """The store is unusable or violated an invariant (a bug or a concurrent corruption)."""

    default_reason = "STORE_ERROR"
