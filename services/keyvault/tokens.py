"""Attestation tokens: short-lived ES256 JWTs with MAA-style claims, their signing keys and checks.

A token is what Attest returns once a quote has verified. Claims (modelled on Microsoft
Azure Attestation's SGX tokens; hex is lower case, base64url has no padding):

==========================  ==================================================================
``iss``                     the keyvault's issuer name (release policies name it as ``authority``)
``iat`` / ``nbf`` / ``exp`` issue time, not-before (= iat) and expiry (iat + TTL, default 10 min)
``jti``                     random token id (128 bits, base64url); a release consumes it once
``nonce``                   base64url of the caller's nonce
``x-ms-ver``                ``"1.0"``
``x-ms-attestation-type``   ``"sgx"``
``x-ms-sgx-is-debuggable``  bool, the enclave's DEBUG attribute
``x-ms-sgx-product-id``     int, ISVPRODID
``x-ms-sgx-svn``            int, ISVSVN
``x-ms-sgx-mrenclave``      hex, 32 bytes
``x-ms-sgx-mrsigner``       hex, 32 bytes
``x-ms-sgx-report-data``    hex, 64 bytes: SHA-256(runtime data || nonce) || 32 zero bytes
``x-ms-sgx-ehd``            base64url of the runtime data (serialized
                            ``veil.enclave.v1.EnclavePublicKeys``)
``x-ms-sgx-tcb-status``     Intel TCB status from collateral, or ``"Unevaluated"`` without it
``x-ms-sgx-advisory-ids``   list of Intel advisory ids (empty without collateral)
``x-ms-sgx-collateral``     ``{"quotehash": hex SHA-256 of the quote}``
==========================  ==================================================================

The JOSE header is exactly ``{"alg": "ES256", "kid": <kid>, "typ": "JWT"}``; the kid is
the RFC 7638 thumbprint of the P-256 public key. Signing keys live in the store with
their private halves KEK-wrapped (AAD ``b"veil/token-signing-key/v1" || kid``); rotation
adds a key and retires the others, which stay in the JWKS until every token they signed
has expired (TTL + leeway), then are purged.

This module issues tokens and keeps their signing keys; verification (pure and strict) is
:func:`veil.verify.tokens.verify_token`, shared with the SDK. :class:`TokenVerifier` binds it
to the key ring and reports a refusal as the keyvault's :class:`TokenRefusedError`. Replay
protection (a ``jti`` releases at most once) is the caller's job via the store.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.services.keyvault.audit import ACTION_ROTATE_SIGNING_KEY, OUTCOME_ALLOWED, AuditLog
from veil.services.keyvault.clock import Clock, to_micros
from veil.services.keyvault.errors import DecryptionError, StoreError, TokenRefusedError
from veil.services.keyvault.kek import Kek
from veil.services.keyvault.store import SigningKeyRecord, Store
from veil.verify import errors as verification
from veil.verify.tokens import (
    ALGORITHM,
    DEFAULT_LEEWAY_S,
    MAX_TOKEN_LIFETIME_S,
    TCB_UNEVALUATED,
    VerifiedToken,
    b64url_encode,
    public_jwk,
    verify_token,
)
from veil.verify.verifier import QuoteFacts

DEFAULT_TOKEN_TTL_S = 600
SIGNING_KEY_AAD_LABEL = b"veil/token-signing-key/v1"


# --- signing keys ------------------------------------------------------------------------------------


def _signing_key_aad(kid: str) -> bytes:
    return SIGNING_KEY_AAD_LABEL + kid.encode("ascii")


@dataclass(frozen=True, eq=False)
class SigningKeyRing:
    """P-256 token-signing keys persisted in the store, private halves KEK-wrapped (and cached
    here once unwrapped, behind a lock)."""

    store: Store
    kek: Kek
    clock: Clock
    audit: AuditLog
    _: KW_ONLY
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    leeway_s: int = DEFAULT_LEEWAY_S
    _cache: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def retention_s(self) -> int:
        """How long a retired key stays published: the longest a token it signed can live."""
        return self.token_ttl_s + self.leeway_s

    def _new_record(self) -> tuple[SigningKeyRecord, ec.EllipticCurvePrivateKey]:
        private_key = ec.generate_private_key(ec.SECP256R1())
        jwk = public_jwk(private_key.public_key())
        der = private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        record = SigningKeyRecord(
            kid=jwk["kid"],
            wrapped_private=self.kek.wrap(der, _signing_key_aad(jwk["kid"])),
            public_jwk_json=json.dumps(jwk, sort_keys=True, separators=(",", ":")),
            created_us=to_micros(self.clock()),
            retired_us=None,
        )
        return record, private_key

    def current(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """The newest active key (kid, private key); the first call on an empty store creates one."""
        with self.store.transaction() as tx:
            active = [key for key in tx.list_signing_keys() if key.retired_us is None]
            if not active:
                record, private_key = self._new_record()
                tx.insert_signing_key(record)
                with self._lock:
                    self._cache[record.kid] = private_key
                return record.kid, private_key
        # Replicas creating a first key at once may leave two active keys; pick one deterministically.
        newest = max(active, key=lambda key: (key.created_us, key.kid))
        return newest.kid, self._private_key(newest)

    def _private_key(self, record: SigningKeyRecord) -> ec.EllipticCurvePrivateKey:
        with self._lock:
            cached = self._cache.get(record.kid)
        if cached is not None:
            return cached
        try:
            der = self.kek.unwrap(record.wrapped_private, _signing_key_aad(record.kid))
        except DecryptionError:
            raise StoreError(f"signing key {record.kid} does not unwrap under the configured KEK") from None
        private_key = serialization.load_der_private_key(der, password=None)
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise StoreError(f"signing key {record.kid} is not an EC key")
        with self._lock:
            self._cache[record.kid] = private_key
        return private_key

    def rotate(self, *, caller: str = "system") -> str:
        """Add a new signing key and retire the others (they stay in the JWKS while tokens live)."""
        record, private_key = self._new_record()
        with self.store.transaction() as tx:
            tx.insert_signing_key(record)
            retired = tx.retire_signing_keys(except_kid=record.kid, retired_us=record.created_us)
            self.audit.append(
                tx,
                action=ACTION_ROTATE_SIGNING_KEY,
                outcome=OUTCOME_ALLOWED,
                caller=caller,
                detail={"kid": record.kid, "retired": retired},
            )
        with self._lock:
            self._cache[record.kid] = private_key
        return record.kid

    def jwks(self) -> dict[str, Any]:
        """The public keys that may verify a live token: active keys and recently retired ones."""
        cutoff = to_micros(self.clock() - self.retention_s)
        with self.store.transaction() as tx:
            records = tx.list_signing_keys()
        keys = [
            json.loads(record.public_jwk_json)
            for record in records
            if record.retired_us is None or record.retired_us >= cutoff
        ]
        return {"keys": keys}

    def purge(self) -> int:
        """Delete keys retired longer ago than any token they signed can live."""
        cutoff = to_micros(self.clock() - self.retention_s)
        with self.store.transaction() as tx:
            removed = tx.delete_signing_keys_retired_before(cutoff)
        return removed


# --- issuing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    """A freshly signed token and its facts (for the response and the audit log)."""

    token: str
    jti: str
    kid: str
    issued_at: int
    expires_at: int
    claims: Mapping[str, Any]


@dataclass(frozen=True)
class TokenIssuer:
    """Signs attestation tokens for verified quotes."""

    ring: SigningKeyRing
    _: KW_ONLY
    issuer: str
    clock: Clock
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S

    def __post_init__(self) -> None:
        if not 0 < self.token_ttl_s <= MAX_TOKEN_LIFETIME_S:
            raise ValueError("token TTL must be positive and at most a day")

    def issue(
        self, quote: QuoteFacts, *, runtime_data: bytes, nonce: bytes, quote_hash: bytes
    ) -> IssuedToken:
        """Sign a token for a verified quote's facts; the caller has checked the report-data binding."""
        now = int(self.clock())
        jti = b64url_encode(secrets.token_bytes(16))
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + self.token_ttl_s,
            "jti": jti,
            "nonce": b64url_encode(nonce),
            "x-ms-ver": "1.0",
            "x-ms-attestation-type": "sgx",
            "x-ms-sgx-is-debuggable": bool(quote.debug),
            "x-ms-sgx-product-id": int(quote.isv_prod_id),
            "x-ms-sgx-svn": int(quote.isv_svn),
            "x-ms-sgx-mrenclave": quote.mrenclave.hex(),
            "x-ms-sgx-mrsigner": quote.mrsigner.hex(),
            "x-ms-sgx-report-data": quote.report_data.hex(),
            "x-ms-sgx-ehd": b64url_encode(runtime_data),
            "x-ms-sgx-tcb-status": quote.tcb_status or TCB_UNEVALUATED,
            "x-ms-sgx-advisory-ids": list(quote.advisory_ids),
            "x-ms-sgx-collateral": {"quotehash": quote_hash.hex()},
        }
        kid, private_key = self.ring.current()
        token = jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})
        return IssuedToken(
            token=token, jti=jti, kid=kid, issued_at=now, expires_at=now + self.token_ttl_s, claims=claims
        )


@dataclass(frozen=True)
class TokenVerifier:
    """:func:`verify_token` bound to the ring's current JWKS, the issuer and the clock."""

    ring: SigningKeyRing
    _: KW_ONLY
    issuer: str
    clock: Clock
    leeway_s: int = DEFAULT_LEEWAY_S

    def verify(self, token: str) -> VerifiedToken:
        """Verify against the keys in the store now (so keys rotated by another replica count)."""
        try:
            return verify_token(
                token, self.ring.jwks(), issuer=self.issuer, now=self.clock(), leeway_s=self.leeway_s
            )
        except verification.TokenError as exc:
            raise TokenRefusedError(exc.reason) from None


def replay_horizon_us(token: VerifiedToken, leeway_s: int) -> int:
    """Until when a used jti must be remembered: past it every replica refuses the token as expired.

    Verification accepts a token until ``exp + leeway`` by the verifying replica's clock; the
    second ``leeway`` covers a replica whose clock runs behind the one that purges.
    """
    return to_micros(token.expires_at + 2 * leeway_s)
