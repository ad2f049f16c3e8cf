"""Attestation tokens: issuing, strict verification, and signing-key rotation."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.store import Store
from veil.services.keyvault.tokens import DEFAULT_TOKEN_TTL_S, IssuedToken, SigningKeyRing, TokenIssuer
from veil.verify.binding import check_report_data, expected_report_data
from veil.verify.errors import AttestationError, TokenError
from veil.verify.tokens import DEFAULT_LEEWAY_S, b64url_decode, b64url_encode, public_jwk, verify_token

from .support import ISSUER, FakeClock, FakeEnclave


def verify(token: str, ring: SigningKeyRing, clock: FakeClock, issuer: str = ISSUER) -> Any:
    return verify_token(token, ring.jwks(), issuer=issuer, now=clock())


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


def resign(
    issued: IssuedToken,
    key: Any,
    *,
    claims: Mapping[str, Any] | None = None,
    alg: str = "ES256",
    **header: Any,
) -> str:
    """``issued``'s claims (or ``claims``) signed by ``key`` under its header, ``header`` on top."""
    return jwt.encode(
        dict(issued.claims if claims is None else claims),
        key,
        algorithm=alg,
        headers={"kid": issued.kid, "typ": "JWT", **header},
    )


@pytest.fixture
def issued(enclave: FakeEnclave, issuer: TokenIssuer) -> IssuedToken:
    """A token the issuer signed for the default enclave."""
    return enclave.token(issuer)


def test_issued_token_has_maa_style_claims(
    issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock, enclave: FakeEnclave
) -> None:
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": "ES256", "kid": issued.kid, "typ": "JWT"}
    claims = claims_of(issued.token)
    assert claims["iss"] == ISSUER
    assert claims["exp"] - claims["iat"] == DEFAULT_TOKEN_TTL_S == 600
    assert claims["nbf"] == claims["iat"] == int(clock())
    assert claims["x-ms-ver"] == "1.0"
    assert claims["x-ms-attestation-type"] == "sgx"
    assert claims["x-ms-sgx-mrenclave"] == enclave.mrenclave.hex()
    assert claims["x-ms-sgx-mrsigner"] == enclave.mrsigner.hex()
    assert claims["x-ms-sgx-is-debuggable"] is False
    assert claims["x-ms-sgx-product-id"] == 1
    assert claims["x-ms-sgx-svn"] == 3
    assert claims["x-ms-sgx-tcb-status"] == "UpToDate"
    assert claims["x-ms-sgx-advisory-ids"] == []
    assert len(claims["x-ms-sgx-collateral"]["quotehash"]) == 64
    assert b64url_decode(claims["x-ms-sgx-ehd"]) == enclave.runtime_data
    nonce = b64url_decode(claims["nonce"])
    assert bytes.fromhex(claims["x-ms-sgx-report-data"]) == expected_report_data(enclave.runtime_data, nonce)

    verified = verify(issued.token, ring, clock)
    assert verified.jti == issued.jti == claims["jti"]
    assert verified.kid == issued.kid
    assert verified.runtime_data == enclave.runtime_data
    assert verified.expires_at == claims["exp"]


def test_unevaluated_tcb_status_without_collateral(issuer: TokenIssuer) -> None:
    issued = FakeEnclave(tcb_status=None).token(issuer)
    assert claims_of(issued.token)["x-ms-sgx-tcb-status"] == "Unevaluated"


def test_lifetime_is_checked_with_the_injected_clock(
    issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock
) -> None:
    token = issued.token
    clock.advance(DEFAULT_TOKEN_TTL_S + DEFAULT_LEEWAY_S - 1)
    verify(token, ring, clock)  # within the skew allowance
    clock.advance(1)
    with pytest.raises(TokenError, match="expired"):
        verify(token, ring, clock)
    with pytest.raises(TokenError, match="not valid yet"):
        verify_token(token, ring.jwks(), issuer=ISSUER, now=clock() - 10_000)


def test_wrong_issuer(issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock) -> None:
    with pytest.raises(TokenError, match="issuer"):
        verify(issued.token, ring, clock, issuer="https://evil.example")


def test_forged_signature_and_unknown_kid(
    issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock
) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenError, match="signature does not verify"):
        verify(resign(issued, attacker), ring, clock)
    unknown = resign(issued, attacker, kid="attacker-kid")
    with pytest.raises(TokenError, match="not a known signing key"):
        verify(unknown, ring, clock)


def test_a_verified_token_is_remembered_only_with_its_exact_key(
    issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock
) -> None:
    """The signature check is memoized by token and exact JWK: a JWKS that later maps the kid to
    another key (a rotation gone wrong, an attacker's JWKS) does not inherit the earlier verdict,
    and a caller changing the claims it got changes nothing for the next verification."""
    first = verify(issued.token, ring, clock)
    first.claims["x-ms-sgx-is-debuggable"] = True  # a careless caller
    assert verify(issued.token, ring, clock).claims["x-ms-sgx-is-debuggable"] is False
    other = dict(public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()), kid=issued.kid)
    with pytest.raises(TokenError, match="signature does not verify"):
        verify_token(issued.token, {"keys": [other]}, issuer=ISSUER, now=clock())


def test_tampered_payload(issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock) -> None:
    header, payload, signature = issued.token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["x-ms-sgx-is-debuggable"] = False
    claims["x-ms-sgx-mrenclave"] = "33" * 32
    tampered = ".".join([header, b64url_encode(json.dumps(claims).encode()), signature])
    with pytest.raises(TokenError, match="signature does not verify"):
        verify(tampered, ring, clock)


def test_algorithm_confusion_is_refused(issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock) -> None:
    claims = dict(issued.claims)
    header = {"kid": issued.kid, "typ": "JWT"}
    # 'none': an unsigned token.
    none_header = b64url_encode(json.dumps({"alg": "none", **header}).encode())
    unsigned = f"{none_header}.{b64url_encode(json.dumps(claims).encode())}."
    with pytest.raises(TokenError, match="'none' is not ES256"):
        verify(unsigned, ring, clock)
    # HS256 keyed with the public JWK text: the classic confusion attack.
    public_json = json.dumps(ring.jwks()["keys"][0]).encode()
    signing_input = ".".join(
        b64url_encode(json.dumps(part).encode()) for part in ({"alg": "HS256", **header}, claims)
    )
    mac = hmac.new(public_json, signing_input.encode(), hashlib.sha256).digest()
    hmac_token = f"{signing_input}.{b64url_encode(mac)}"
    with pytest.raises(TokenError, match="'HS256' is not ES256"):
        verify(hmac_token, ring, clock)
    es384 = resign(issued, ec.generate_private_key(ec.SECP384R1()), alg="ES384")
    with pytest.raises(TokenError, match="'ES384' is not ES256"):
        verify(es384, ring, clock)


@pytest.mark.parametrize(
    "extra", [{"jku": "https://evil.example/jwks"}, {"crit": ["exp"]}, {"typ": "at+jwt"}]
)
def test_unexpected_header_fields_are_refused(
    issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock, extra: dict[str, Any]
) -> None:
    _, private_key = ring.current()
    with pytest.raises(TokenError):
        verify(resign(issued, private_key, **extra), ring, clock)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"jti": None}, "lacks claims: jti"),
        ({"x-ms-sgx-ehd": None}, "lacks claims: x-ms-sgx-ehd"),
        ({"exp": "soon"}, "'exp' must be an integer"),
        ({"x-ms-sgx-is-debuggable": "false"}, "must be a boolean"),
        ({"x-ms-attestation-type": "sevsnpvm"}, "not an SGX attestation token"),
        ({"x-ms-sgx-ehd": "not base64!"}, "malformed"),
        ({"x-ms-sgx-mrenclave": "AB" * 32}, "malformed"),
        ({"jti": "short"}, "jti is malformed"),
        ({"exp": 2_000_000_000 + 90_000, "iat": 1_750_000_000}, "lifetime is invalid"),
    ],
)
def test_claims_are_checked(
    issued: IssuedToken, ring: SigningKeyRing, clock: FakeClock, change: dict[str, Any], message: str
) -> None:
    claims = {name: value for name, value in {**issued.claims, **change}.items() if value is not None}
    _, private_key = ring.current()
    with pytest.raises(TokenError, match=message):
        verify(resign(issued, private_key, claims=claims), ring, clock)


def test_garbage_tokens(ring: SigningKeyRing, clock: FakeClock) -> None:
    for token in ("", "a.b", "not a token at all", "x" * 20_000):
        with pytest.raises(TokenError):
            verify(token, ring, clock)


def test_rotation_keeps_old_keys_until_their_tokens_expire(
    issuer: TokenIssuer, ring: SigningKeyRing, clock: FakeClock, enclave: FakeEnclave, store: Store
) -> None:
    old = enclave.token(issuer)
    new_kid = ring.rotate()
    assert new_kid != old.kid
    fresh = enclave.token(issuer)
    assert fresh.kid == new_kid
    assert {k["kid"] for k in ring.jwks()["keys"]} == {old.kid, new_kid}
    verify(old.token, ring, clock)  # still valid after rotation
    clock.advance(ring.retention_s + 1)
    assert {k["kid"] for k in ring.jwks()["keys"]} == {new_kid}
    assert ring.purge() == 1
    with store.transaction() as tx:
        assert [k.kid for k in tx.list_signing_keys()] == [new_kid]


def test_signing_keys_are_stored_wrapped_and_shared_by_replicas(
    ring: SigningKeyRing, store: Store, kek: FileKek, clock: FakeClock, audit: AuditLog
) -> None:
    kid, private_key = ring.current()
    der = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with store.transaction() as tx:
        (record,) = tx.list_signing_keys()
    assert record.kid == kid
    assert der not in record.wrapped_private
    assert json.loads(record.public_jwk_json) == public_jwk(private_key.public_key())
    # Another replica (same store and KEK, cold cache) signs with the same key.
    replica_ring = SigningKeyRing(store, kek, clock, audit)
    replica_kid, replica_key = replica_ring.current()
    assert replica_kid == kid
    assert replica_key.private_numbers() == private_key.private_numbers()


def test_report_data_binding() -> None:
    nonce = b"n" * 32
    good = expected_report_data(b"runtime", nonce)
    check_report_data(good, b"runtime", nonce)
    with pytest.raises(AttestationError, match="does not bind"):
        check_report_data(good, b"runtime", b"o" * 32)
    with pytest.raises(AttestationError, match="does not bind"):
        check_report_data(good, b"runtime!", nonce)
    with pytest.raises(AttestationError, match="must be zero"):
        check_report_data(good[:32] + b"\x01" + good[33:], b"runtime", nonce)
    with pytest.raises(AttestationError):
        check_report_data(good[:32], b"runtime", nonce)
    with pytest.raises(AttestationError, match="nonce must be 32 bytes"):
        check_report_data(good, b"runtime", b"short")


@pytest.mark.parametrize("text", ["AA==", "A+/B", "AB", "a b", "Zg=", "Zh"])
def test_b64url_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)
