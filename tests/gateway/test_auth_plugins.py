"""Per-instance authentication plugins and their configuration file."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.services.common.config import ConfigError
from veil.services.common.errors import Unauthenticated
from veil.services.gateway.auth import (
    ANONYMOUS,
    Credentials,
    Principal,
    load_authenticators,
    parse_authenticators,
)

ISSUER = "https://idp.example"
AUDIENCE = "veil"


def _rsa_jwks() -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "rsa-1"
    return key, {"keys": [jwk]}


def _token(key: Any, *, kid: str = "rsa-1", algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


def _bearer(token: str) -> Credentials:
    return Credentials(None, {"authorization": f"Bearer {token}"})


def _policy(jwks: dict[str, Any]) -> Any:
    return parse_authenticators(
        {
            "default": {"type": "none"},
            "instances": {
                "payroll": {
                    "type": "api_key",
                    "keys": {"hr-bot": "sha256:" + hashlib.sha256(b"s3cret").hexdigest()},
                },
                "ballots": {"type": "oauth2", "issuer": ISSUER, "audience": AUDIENCE, "jwks": jwks},
            },
        }
    )


def test_none_names_the_certificate_or_anonymous() -> None:
    policy = parse_authenticators({"default": {"type": "none"}})
    assert policy.authenticate("x", Credentials(None)) == ANONYMOUS
    assert policy.authenticate("x", Credentials("spiffe://veil/admin")) == Principal(
        "certificate", "spiffe://veil/admin"
    )


def test_api_key_plugin() -> None:
    policy = _policy(_rsa_jwks()[1])
    assert policy.authenticate("payroll", Credentials(None, {"x-api-key": "s3cret"})) == Principal(
        "api-key", "payroll:hr-bot"
    )
    assert (
        policy.authenticate("payroll", Credentials(None, {"authorization": "ApiKey s3cret"})).name
        == "payroll:hr-bot"
    )
    with pytest.raises(Unauthenticated) as missing:
        policy.authenticate("payroll", Credentials("spiffe://veil/admin"))
    assert missing.value.reason == "API_KEY_MISSING"
    with pytest.raises(Unauthenticated) as wrong:
        policy.authenticate("payroll", Credentials(None, {"x-api-key": "guess"}))
    assert wrong.value.reason == "API_KEY_INVALID"


def test_oauth2_plugin_accepts_a_good_token_and_names_its_subject() -> None:
    key, jwks = _rsa_jwks()
    assert _policy(jwks).authenticate("ballots", _bearer(_token(key))) == Principal(
        "oauth2", json.dumps([ISSUER, "alice"])
    )


def test_oauth2_principals_of_two_issuers_never_meet() -> None:
    """Issuer "https://idp.example:8443" with subject "alice" and issuer "https://idp.example"
    with subject "8443:alice" were one principal (joined with ":"): one rate bucket, one owner
    of receipt streams."""
    key, jwks = _rsa_jwks()
    other = parse_authenticators(
        {
            "default": {"type": "none"},
            "instances": {
                "ballots": {"type": "oauth2", "issuer": f"{ISSUER}:8443", "audience": AUDIENCE, "jwks": jwks}
            },
        }
    )
    plain = _policy(jwks).authenticate("ballots", _bearer(_token(key, sub="8443:alice")))
    ported = other.authenticate("ballots", _bearer(_token(key, iss=f"{ISSUER}:8443")))
    assert plain.key != ported.key


def test_oauth2_plugin_refuses_a_token_with_two_readings() -> None:
    """Duplicate claims: PyJWT keeps the last "sub", the enclave refuses the token; the gateway
    must not name the caller by a reading the enclave does not share."""
    key, jwks = _rsa_jwks()
    header = jwt.utils.base64url_encode(json.dumps({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    now = int(time.time())
    claims = f'{{"iss": "{ISSUER}", "aud": "{AUDIENCE}", "sub": "u1", "sub": "u2", "exp": {now + 300}}}'
    signing_input = header + b"." + jwt.utils.base64url_encode(claims.encode())
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(signing_input, key)
    token = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    with pytest.raises(Unauthenticated) as refused:
        _policy(jwks).authenticate("ballots", _bearer(token))
    assert refused.value.reason == "BEARER_INVALID"
    assert "duplicate" in str(refused.value)


def test_oauth2_plugin_accepts_es256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "ec-1"
    policy = _policy({"keys": [jwk]})
    assert policy.authenticate(
        "ballots", _bearer(_token(key, kid="ec-1", algorithm="ES256"))
    ).name == json.dumps([ISSUER, "alice"])


@pytest.mark.parametrize(
    ("claims", "drop"),
    [
        ({"aud": "someone-else"}, ()),
        ({"iss": "https://evil.example"}, ()),
        ({"exp": int(time.time()) - 3600}, ()),
        ({}, ("sub",)),
        ({}, ("exp",)),
    ],
)
def test_oauth2_plugin_refuses_wrong_or_missing_claims(claims: dict[str, Any], drop: tuple[str, ...]) -> None:
    key, jwks = _rsa_jwks()
    payload = jwt.decode(_token(key, **claims), options={"verify_signature": False})
    token = jwt.encode(
        {k: v for k, v in payload.items() if k not in drop}, key, "RS256", headers={"kid": "rsa-1"}
    )
    with pytest.raises(Unauthenticated):
        _policy(jwks).authenticate("ballots", _bearer(token))


def test_oauth2_plugin_refuses_other_keys_hmac_and_missing_tokens() -> None:
    _key, jwks = _rsa_jwks()
    other, _ = _rsa_jwks()
    policy = _policy(jwks)
    with pytest.raises(Unauthenticated):
        policy.authenticate("ballots", _bearer(_token(other)))
    # HS256 keyed with the public JWK must never pass (algorithm confusion).
    hmac_token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": time.time() + 60}, "k" * 32, "HS256"
    )
    with pytest.raises(Unauthenticated):
        policy.authenticate("ballots", _bearer(hmac_token))
    with pytest.raises(Unauthenticated) as missing:
        policy.authenticate("ballots", Credentials(None))
    assert missing.value.reason == "BEARER_MISSING"


def test_file_without_default_fails_closed_for_unlisted_instances(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"instances": {"open": {"type": "none"}}}))
    policy = load_authenticators(path)
    assert policy.authenticate("open", Credentials(None)) == ANONYMOUS
    with pytest.raises(Unauthenticated) as refused:
        policy.authenticate("anything-else", Credentials("spiffe://veil/admin"))
    assert refused.value.reason == "NO_AUTH_POLICY"


def test_no_file_means_none_everywhere() -> None:
    assert load_authenticators(None).authenticate("anything", Credentials(None)) == ANONYMOUS


def test_yaml_file_with_a_relative_jwks_file(tmp_path: Path) -> None:
    key, jwks = _rsa_jwks()
    (tmp_path / "idp.json").write_text(json.dumps(jwks))
    path = tmp_path / "auth.yaml"
    path.write_text(
        "default:\n  type: none\ninstances:\n  ballots:\n    type: oauth2\n"
        f"    issuer: {ISSUER}\n    audience: {AUDIENCE}\n    jwks_file: idp.json\n"
    )
    assert load_authenticators(path).authenticate("ballots", _bearer(_token(key))).name == json.dumps(
        [ISSUER, "alice"]
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"instances": {"a": {"type": "api_key", "keys": {"k": "plaintext"}}}}, "never in plain text"),
        ({"instances": {"a": {"type": "ldap"}}}, "unknown plugin type"),
        ({"instances": {"a": {"type": "oauth2", "issuer": ISSUER, "audience": AUDIENCE}}}, "jwks"),
        (
            {"instances": {"a": {"type": "oauth2", "issuer": ISSUER, "audience": AUDIENCE,
                                 "jwks": {"keys": []}, "algorithms": ["HS256"]}}},
            "algorithms",
        ),
        ({"defaults": {}}, "unknown keys"),
    ],
)  # fmt: skip
def test_bad_configuration_fails_at_start(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_authenticators(document)
