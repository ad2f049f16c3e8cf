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

:func:`verify_token` is pure (JWKS, issuer and time are arguments) and strict: the header
must be exactly alg/kid/typ with ``alg`` ES256 (``none``, HS* and everything else are
refused before any key is touched), the kid must be in the JWKS as a P-256 key, and the
signature, issuer, lifetime (with ``now`` injected) and claim types must check out.
Replay protection (a ``jti`` releases at most once) is the caller's job via the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.enclave import wire
from veil.services.keyvault.audit import ACTION_ROTATE_SIGNING_KEY, OUTCOME_ALLOWED, AuditLog
from veil.services.keyvault.clock import Clock, to_micros
from veil.services.keyvault.errors import AttestationError, DecryptionError, StoreError, TokenError
from veil.services.keyvault.kek import Kek
from veil.services.keyvault.store import SigningKeyRecord, Store

ALGORITHM = "ES256"
DEFAULT_TOKEN_TTL_S = 600
#: Clock skew tolerated between replicas for nbf/iat/exp.
DEFAULT_LEEWAY_S = 30
#: Upper bound on exp - iat accepted from any issuer: tokens are meant to be short-lived.
MAX_TOKEN_LIFETIME_S = 24 * 3600
MAX_TOKEN_CHARS = 16 * 1024
TCB_UNEVALUATED = "Unevaluated"

SIGNING_KEY_AAD_LABEL = b"veil/token-signing-key/v1"
_REQUIRED_CLAIMS = (
    "iss",
    "iat",
    "nbf",
    "exp",
    "jti",
    "nonce",
    "x-ms-ver",
    "x-ms-attestation-type",
    "x-ms-sgx-is-debuggable",
    "x-ms-sgx-product-id",
    "x-ms-sgx-svn",
    "x-ms-sgx-mrenclave",
    "x-ms-sgx-mrsigner",
    "x-ms-sgx-report-data",
    "x-ms-sgx-ehd",
    "x-ms-sgx-tcb-status",
)
_ALLOWED_HEADER_KEYS = frozenset({"alg", "kid", "typ"})


class AttestedQuote(Protocol):
    """What a verified quote tells (``attestation.VerifiedQuote`` satisfies this)."""

    @property
    def mrenclave(self) -> bytes: ...
    @property
    def mrsigner(self) -> bytes: ...
    @property
    def isv_prod_id(self) -> int: ...
    @property
    def isv_svn(self) -> int: ...
    @property
    def debug(self) -> bool: ...
    @property
    def report_data(self) -> bytes: ...
    @property
    def tcb_status(self) -> str | None: ...
    @property
    def advisory_ids(self) -> Sequence[str]: ...


# --- encodings ---------------------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (JOSE style)."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text: str) -> bytes:
    """Strict base64url: unpadded, URL alphabet only, canonical (re-encodes to the same text)."""
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def expected_report_data(runtime_data: bytes, nonce: bytes) -> bytes:
    """The report data an enclave quotes for its runtime data and a 32-byte nonce (wire.report_data)."""
    try:
        return wire.report_data(runtime_data, nonce)
    except ValueError as exc:
        raise AttestationError(str(exc)) from None


def check_report_data(report_data: bytes, runtime_data: bytes, nonce: bytes) -> None:
    """Raise :class:`AttestationError` unless ``report_data`` binds ``runtime_data`` and ``nonce``."""
    expected = expected_report_data(runtime_data, nonce)
    if len(report_data) != 64 or not secrets.compare_digest(report_data[:32], expected[:32]):
        raise AttestationError("report data does not bind the runtime data and nonce")
    if report_data[32:] != bytes(32):
        raise AttestationError("report data bytes 32..63 must be zero")


# --- JWKs ----------------------------------------------------------------------------------------


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The JWK of a P-256 public key, with its RFC 7638 thumbprint as kid."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError("signing keys are P-256")
    numbers = public_key.public_numbers()
    x = b64url_encode(numbers.x.to_bytes(32, "big"))
    y = b64url_encode(numbers.y.to_bytes(32, "big"))
    thumbprint_input = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"))
    kid = b64url_encode(hashlib.sha256(thumbprint_input.encode("ascii")).digest())
    return {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": ALGORITHM}


def _jwk_public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise TokenError("JWKS key is not an EC P-256 key")
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        raise TokenError("JWKS key is not an ES256 signing key")
    try:
        x = b64url_decode(jwk["x"])
        y = b64url_decode(jwk["y"])
        if len(x) != 32 or len(y) != 32:
            raise ValueError("bad coordinate length")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        )
        return numbers.public_key()  # checks the point is on the curve
    except (KeyError, ValueError, TypeError):
        raise TokenError("JWKS key is malformed") from None


# --- verification ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature, issuer, lifetime and claim shapes verified."""

    claims: Mapping[str, Any]
    kid: str
    jti: str
    issued_at: int
    expires_at: int
    runtime_data: bytes
    nonce: bytes
    report_data: bytes

    @property
    def mrenclave(self) -> str:
        return str(self.claims["x-ms-sgx-mrenclave"])

    @property
    def mrsigner(self) -> str:
        return str(self.claims["x-ms-sgx-mrsigner"])

    @property
    def debuggable(self) -> bool:
        return bool(self.claims["x-ms-sgx-is-debuggable"])

    @property
    def tcb_status(self) -> str:
        return str(self.claims["x-ms-sgx-tcb-status"])


def verify_token(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str,
    now: float,
    leeway_s: float = DEFAULT_LEEWAY_S,
) -> VerifiedToken:
    """Verify an attestation token against a JWKS; raise :class:`TokenError` with the reason."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token is empty or too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise TokenError("token is not a JWS") from None
    alg = header.get("alg")
    if alg != ALGORITHM:
        # Checked first and explicitly: 'none' and HMAC confusion never reach a key.
        raise TokenError(f"token algorithm {alg!r} is not {ALGORITHM}")
    if set(header) - _ALLOWED_HEADER_KEYS or header.get("typ", "JWT") != "JWT":
        raise TokenError("token header has unexpected fields")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenError("token header has no kid")
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise TokenError("JWKS has no keys")
    matches = [key for key in keys if isinstance(key, Mapping) and key.get("kid") == kid]
    if len(matches) != 1:
        raise TokenError(f"token kid {kid!r} is not a known signing key")
    public_key = _jwk_public_key(matches[0])
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=public_key,
            algorithms=[ALGORITHM],
            # Time and issuer are checked below with the injected clock; pyjwt reads the wall clock.
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_iss": False,
                "verify_aud": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except jwt.InvalidTokenError:
        raise TokenError("token signature does not verify") from None
    return _check_claims(claims, kid=kid, issuer=issuer, now=now, leeway_s=leeway_s)


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenError(f"token claim {name!r} must be an integer")
    return value


def _check_claims(
    claims: dict[str, Any], *, kid: str, issuer: str, now: float, leeway_s: float
) -> VerifiedToken:
    missing = [name for name in _REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise TokenError(f"token lacks claims: {', '.join(missing)}")
    if claims["iss"] != issuer:
        raise TokenError(f"token issuer {claims['iss']!r} is not {issuer!r}")
    iat, nbf, exp = (_int_claim(claims, name) for name in ("iat", "nbf", "exp"))
    if exp <= now - leeway_s:
        raise TokenError("token has expired")
    if nbf > now + leeway_s or iat > now + leeway_s:
        raise TokenError("token is not valid yet")
    if not iat <= exp or exp - iat > MAX_TOKEN_LIFETIME_S:
        raise TokenError("token lifetime is invalid")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 16 <= len(jti) <= 128:
        raise TokenError("token jti is malformed")
    if claims["x-ms-attestation-type"] != "sgx":
        raise TokenError("token is not an SGX attestation token")
    if not isinstance(claims["x-ms-sgx-is-debuggable"], bool):
        raise TokenError("token claim 'x-ms-sgx-is-debuggable' must be a boolean")
    for name in ("x-ms-sgx-product-id", "x-ms-sgx-svn"):
        _int_claim(claims, name)
    try:
        runtime_data = b64url_decode(claims["x-ms-sgx-ehd"])
        nonce = b64url_decode(claims["nonce"])
        report_data = _hex(claims["x-ms-sgx-report-data"], 64)
        _hex(claims["x-ms-sgx-mrenclave"], 32)
        _hex(claims["x-ms-sgx-mrsigner"], 32)
    except ValueError as exc:
        raise TokenError(f"token claim is malformed: {exc}") from None
    if not isinstance(claims["x-ms-sgx-tcb-status"], str):
        raise TokenError("token claim 'x-ms-sgx-tcb-status' must be a string")
    return VerifiedToken(
        claims=claims,
        kid=kid,
        jti=jti,
        issued_at=iat,
        expires_at=exp,
        runtime_data=runtime_data,
        nonce=nonce,
        report_data=report_data,
    )


def _hex(value: object, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or value != value.lower():
        raise ValueError(f"expected {size} bytes of lower-case hex")
    return bytes.fromhex(value)


# --- signing keys ------------------------------------------------------------------------------------


def _signing_key_aad(kid: str) -> bytes:
    return SIGNING_KEY_AAD_LABEL + kid.encode("ascii")


class SigningKeyRing:
    """P-256 token-signing keys persisted in the store, private halves KEK-wrapped."""

    def __init__(
        self,
        store: Store,
        kek: Kek,
        clock: Clock,
        audit: AuditLog,
        *,
        token_ttl_s: int = DEFAULT_TOKEN_TTL_S,
        leeway_s: int = DEFAULT_LEEWAY_S,
    ) -> None:
        self._store = store
        self._kek = kek
        self._clock = clock
        self._audit = audit
        self._token_ttl_s = token_ttl_s
        self._leeway_s = leeway_s
        self._cache: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._lock = threading.Lock()

    @property
    def retention_s(self) -> int:
        """How long a retired key stays published: the longest a token it signed can live."""
        return self._token_ttl_s + self._leeway_s

    def _new_record(self) -> tuple[SigningKeyRecord, ec.EllipticCurvePrivateKey]:
        private_key = ec.generate_private_key(ec.SECP256R1())
        jwk = public_jwk(private_key.public_key())
        der = private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        record = SigningKeyRecord(
            kid=jwk["kid"],
            wrapped_private=self._kek.wrap(der, _signing_key_aad(jwk["kid"])),
            public_jwk_json=json.dumps(jwk, sort_keys=True, separators=(",", ":")),
            created_us=to_micros(self._clock()),
            retired_us=None,
        )
        return record, private_key

    def current(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """The newest active key (kid, private key); the first call on an empty store creates one."""
        with self._store.transaction() as tx:
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
            der = self._kek.unwrap(record.wrapped_private, _signing_key_aad(record.kid))
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
        with self._store.transaction() as tx:
            tx.insert_signing_key(record)
            retired = tx.retire_signing_keys(except_kid=record.kid, retired_us=record.created_us)
            self._audit.append(
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
        cutoff = to_micros(self._clock() - self.retention_s)
        with self._store.transaction() as tx:
            records = tx.list_signing_keys()
        keys = [
            json.loads(record.public_jwk_json)
            for record in records
            if record.retired_us is None or record.retired_us >= cutoff
        ]
        return {"keys": keys}

    def purge(self) -> int:
        """Delete keys retired longer ago than any token they signed can live."""
        cutoff = to_micros(self._clock() - self.retention_s)
        with self._store.transaction() as tx:
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


class TokenIssuer:
    """Signs attestation tokens for verified quotes."""

    def __init__(
        self, ring: SigningKeyRing, *, issuer: str, clock: Clock, token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    ) -> None:
        if not 0 < token_ttl_s <= MAX_TOKEN_LIFETIME_S:
            raise ValueError("token TTL must be positive and at most a day")
        self._ring = ring
        self._issuer = issuer
        self._clock = clock
        self._ttl = token_ttl_s

    @property
    def issuer(self) -> str:
        return self._issuer

    def issue(
        self, quote: AttestedQuote, *, runtime_data: bytes, nonce: bytes, quote_hash: bytes
    ) -> IssuedToken:
        """Sign a token for ``quote``; the caller has checked the report-data binding."""
        now = int(self._clock())
        jti = b64url_encode(secrets.token_bytes(16))
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "iat": now,
            "nbf": now,
            "exp": now + self._ttl,
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
        kid, private_key = self._ring.current()
        token = jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})
        return IssuedToken(
            token=token, jti=jti, kid=kid, issued_at=now, expires_at=now + self._ttl, claims=claims
        )


class TokenVerifier:
    """:func:`verify_token` bound to the ring's current JWKS, the issuer and the clock."""

    def __init__(
        self, ring: SigningKeyRing, *, issuer: str, clock: Clock, leeway_s: int = DEFAULT_LEEWAY_S
    ) -> None:
        self._ring = ring
        self._issuer = issuer
        self._clock = clock
        self._leeway_s = leeway_s

    @property
    def leeway_s(self) -> int:
        return self._leeway_s

    def verify(self, token: str) -> VerifiedToken:
        """Verify against the keys in the store now (so keys rotated by another replica count)."""
        return verify_token(
            token, self._ring.jwks(), issuer=self._issuer, now=self._clock(), leeway_s=self._leeway_s
        )


def replay_horizon_us(token: VerifiedToken, leeway_s: int) -> int:
    """Until when a used jti must be remembered: past it every replica refuses the token as expired.

    Verification accepts a token until ``exp + leeway`` by the verifying replica's clock; the
    second ``leeway`` covers a replica whose clock runs behind the one that purges.
    """
    return to_micros(token.expires_at + 2 * leeway_s)
