"""Minimal JWT (RFC 7519) verification for OAuth2 access tokens, on `cryptography` only.

Accepts compact JWS tokens signed RS256 (RSA PKCS#1 v1.5, >= 2048-bit keys) or ES256
(P-256, raw r || s) by a key of the JWKS fixed when the instance was created. No other
algorithm is accepted ("none" and HMAC in particular), `crit` headers are refused, and JSON
with duplicate keys is refused so one token has one reading.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from veil.enclave import wire

MAX_TOKEN_SIZE = 16 * 1024
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class JwtError(Exception):
    """The token or the JWKS is unusable; the message says why."""


class JwtTimeError(JwtError):
    """The token is not valid at the time given (expired, or not yet valid): it may be at another."""


def _b64url(segment: str) -> bytes:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise JwtError("malformed base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise JwtError("malformed base64url") from None


def _json_object(data: bytes | str, what: str) -> dict[str, Any]:
    return wire.strict_json_object(data, what, JwtError)


def _b64_int(value: object, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise JwtError(f"JWK {what} missing")
    return int.from_bytes(_b64url(value), "big")


@dataclass(frozen=True)
class _Jwk:
    kid: str | None
    alg: str  # "RS256" or "ES256"
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _parse_jwk(jwk: dict[str, Any]) -> _Jwk | None:
    kty = jwk.get("kty")
    if jwk.get("use", "sig") != "sig":
        return None
    kid = jwk.get("kid")
    kid = kid if isinstance(kid, str) else None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if kty == "RSA":
        key = rsa.RSAPublicNumbers(_b64_int(jwk.get("e"), "e"), _b64_int(jwk.get("n"), "n")).public_key()
        if key.key_size < 2048:
            raise JwtError("RSA keys must have at least 2048 bits")
        alg = "RS256"
    elif kty == "EC":
        if jwk.get("crv") != "P-256":
            return None
        x, y = _b64_int(jwk.get("x"), "x"), _b64_int(jwk.get("y"), "y")
        try:
            key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except ValueError:
            raise JwtError("EC key is not on P-256") from None
        alg = "ES256"
    else:
        return None
    if jwk.get("alg", alg) != alg:
        return None
    return _Jwk(kid=kid, alg=alg, key=key)


class JwksVerifier:
    """Verifies tokens against a JWKS (JSON text) and one issuer and audience."""

    def __init__(self, jwks_json: str, *, issuer: str, audience: str) -> None:
        if not issuer or not audience:
            raise JwtError("issuer and audience are required")
        keys = _json_object(jwks_json, "JWKS").get("keys")
        if not isinstance(keys, list):
            raise JwtError("JWKS has no keys array")
        try:
            parsed = [_parse_jwk(k) for k in keys if isinstance(k, dict)]
        except ValueError:
            raise JwtError("JWKS has an invalid key") from None
        self._keys = [k for k in parsed if k is not None]
        if not self._keys:
            raise JwtError("JWKS has no usable RS256 or ES256 signing key")
        self._issuer = issuer
        self._audience = audience

    def verify(self, token: str, now_ms: int) -> str:
        """Return the token's `sub` if it is valid at `now_ms`, else raise JwtError."""
        if len(token) > MAX_TOKEN_SIZE:
            raise JwtError("token too large")
        parts = token.split(".")
        if len(parts) != 3:
            raise JwtError("token is not a compact JWS")
        raw_header, raw_claims, signature = (_b64url(part) for part in parts)  # all ASCII from here
        header = _json_object(raw_header, "token header")
        alg = header.get("alg")
        if alg not in ("RS256", "ES256"):
            raise JwtError("token algorithm not accepted")
        if "crit" in header:
            raise JwtError("token has critical header parameters")
        kid = header.get("kid")
        candidates = [k for k in self._keys if k.alg == alg and (kid is None or k.kid == kid)]
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not any(_signature_ok(k, signature, signed) for k in candidates):
            raise JwtError("token signature invalid")
        return self._check_claims(_json_object(raw_claims, "token claims"), now_ms)

    def _check_claims(self, claims: dict[str, Any], now_ms: int) -> str:
        if claims.get("iss") != self._issuer:
            raise JwtError("token issuer not accepted")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self._audience not in audiences:
            raise JwtError("token audience not accepted")
        if now_ms >= _seconds(claims, "exp", None) * 1000:
            raise JwtTimeError("token expired")
        if now_ms < _seconds(claims, "nbf", 0) * 1000:
            raise JwtTimeError("token not yet valid")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise JwtError("token has no subject")
        return sub


def _seconds(claims: dict[str, Any], name: str, default: float | None) -> float:
    """A NumericDate claim; required when there is no default."""
    value = claims.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise JwtError(f"token claim {name} missing or not a number")
    if isinstance(value, float) and not math.isfinite(value):  # "1e400" parses as infinity
        raise JwtError(f"token claim {name} is not finite")
    return value


def _signature_ok(jwk: _Jwk, signature: bytes, signed: bytes) -> bool:
    try:
        if isinstance(jwk.key, rsa.RSAPublicKey):
            jwk.key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            if len(signature) != 64:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            jwk.key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
