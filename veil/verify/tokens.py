"""Attestation tokens, verifier side: ES256 JWTs with MAA-style claims, checked strictly.

The keyvault issues them (:mod:`veil.services.keyvault.tokens` documents every claim); a client
and the keyvault itself verify them here. :func:`verify_token` is pure (JWKS, issuer and time
are arguments) and strict: the header must be exactly alg/kid/typ with ``alg`` ES256 (``none``,
HS* and everything else are refused before any key is touched), the kid must be in the JWKS as
a P-256 key, and the signature, issuer, lifetime (with ``now`` injected) and claim types must
check out. Replay protection (a ``jti`` releases at most once) is the keyvault's job.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from veil.verify.errors import TokenError

ALGORITHM = "ES256"
#: Clock skew tolerated between replicas for nbf/iat/exp.
DEFAULT_LEEWAY_S = 30
#: Upper bound on exp - iat accepted from any issuer: tokens are meant to be short-lived.
MAX_TOKEN_LIFETIME_S = 24 * 3600
MAX_TOKEN_CHARS = 16 * 1024
#: The TCB status of a token issued for a quote verified without collateral.
TCB_UNEVALUATED = "Unevaluated"

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
    # The exact key (not only its kid) is part of the memo's key: a token is never taken as
    # verified by a key the JWKS no longer holds.
    claims = copy.deepcopy(_signed_claims(token, json.dumps(matches[0], sort_keys=True)))
    return _check_claims(claims, kid=kid, issuer=issuer, now=now, leeway_s=leeway_s)


@functools.lru_cache(maxsize=1024)
def _signed_claims(token: str, jwk_json: str) -> dict[str, Any]:
    """The claims of `token` if the JWK signed it (memoized: a verifier sees the same token on
    every head advance of its enclave; times and claims are checked by the caller each time)."""
    public_key = _jwk_public_key(json.loads(jwk_json))
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
    return claims


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
