"""A JWT whose header algorithm does not fit the key is refused, charged, and logs no traceback
(issue 17, item 6 of the review: PyJWT raised TypeError for an RS256 header over an EC key, and
the gateway answered INTERNAL with an ERROR traceback per request and no rate-limit charge)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.conftest import refused
from tests.gateway.support import InProcessMesh, mesh_fixture
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.config import ConfigError
from veil.services.gateway.auth import OAuth2Auth

ISSUER = "https://idp.example"
AUDIENCE = "veil"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
# The attacker's own keys, of other types and curves.
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_P384 = ec.generate_private_key(ec.SECP384R1())
ATTACKER_P521 = ec.generate_private_key(ec.SECP521R1())
ATTACKER_P256 = ec.generate_private_key(ec.SECP256R1())
ATTACKER_ED25519 = ed25519.Ed25519PrivateKey.generate()


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: object, signature: Callable[[bytes], bytes] = lambda _: b"\0" * 64) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    return f"{signing_input}.{_b64(signature(signing_input.encode()))}"


def _signed(key: Any, algorithm: str, kid: str) -> str:
    return jwt.encode(_claims(), key, algorithm=algorithm, headers={"kid": kid})


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hs256_with(secret: bytes, kid: str) -> str:
    return _raw(
        {"alg": "HS256", "typ": "JWT", "kid": kid},
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )


ATTACKS: dict[str, Callable[[], str]] = {
    "RS256 header over the EC key": lambda: _signed(ATTACKER_RSA, "RS256", "ec-1"),
    "PS256 header over the EC key": lambda: _signed(ATTACKER_RSA, "PS256", "ec-1"),
    "ES512 header over the P-256 key": lambda: _signed(ATTACKER_P521, "ES512", "ec-1"),
    "ES384 header over the P-256 key": lambda: _signed(ATTACKER_P384, "ES384", "ec-1"),
    "ES256 header over the RSA key": lambda: _signed(ATTACKER_P256, "ES256", "rsa-1"),
    "EdDSA header over the RSA key": lambda: _signed(ATTACKER_ED25519, "EdDSA", "rsa-1"),
    "HS256 keyed with the RSA public key": lambda: _hs256_with(_pem(RSA_KEY), "rsa-1"),
    "HS256 keyed with the EC public key": lambda: _hs256_with(_pem(EC_KEY), "ec-1"),
    "alg none": lambda: _raw({"alg": "none", "kid": "ec-1"}, lambda _: b""),
    "no alg": lambda: _raw({"kid": "ec-1"}),
    "alg a list": lambda: _raw({"alg": ["ES256"], "kid": "ec-1"}),
    "kid an object": lambda: _raw({"alg": "ES256", "kid": {"$ne": ""}}),
    "header not an object": lambda: f"{_b64(b'[1]')}.{_b64(b'{}')}.{_b64(b'x')}",
}


def _jwks() -> dict[str, Any]:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    return {"keys": [{**rsa_jwk, "kid": "rsa-1"}, {**ec_jwk, "kid": "ec-1"}]}


def _mesh(pki_dir: Path, tmp_path: Path, burst: float) -> Iterator[InProcessMesh]:
    auth = tmp_path / "gateway-auth.json"
    algorithms = ["RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA"]  # every type the gateway knows
    plugin = {
        "type": "oauth2",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks": _jwks(),
        "algorithms": algorithms,
    }
    auth.write_text(json.dumps({"default": plugin}))
    options = {"auth_file": auth, "rate_per_second": 0.001, "burst": burst}
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options=options)


def _ping(mesh: InProcessMesh, token: str) -> gateway_pb2.PingResponse:
    credentials = grpc.ssl_channel_credentials(root_certificates=(mesh.pki_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(mesh.public_address, credentials) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply: gateway_pb2.PingResponse = stub.Ping(
            gateway_pb2.PingRequest(instance_id="ballots", payload=b"x"),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
        return reply


def test_mismatched_algorithms_are_unauthenticated_without_a_traceback(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for mesh in _mesh(pki_dir, tmp_path, burst=100):
        answers = {
            name: refused(functools.partial(_ping, mesh, attack())) for name, attack in ATTACKS.items()
        }
        wrong = {n: a for n, a in answers.items() if a != (grpc.StatusCode.UNAUTHENTICATED, "BEARER_INVALID")}
        assert not wrong
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        # The honest keys of both types still work.
        assert _ping(mesh, _signed(EC_KEY, "ES256", "ec-1")).payload == b"x"
        assert _ping(mesh, _signed(RSA_KEY, "PS256", "rsa-1")).payload == b"x"


def test_every_failed_attempt_is_charged(pki_dir: Path, tmp_path: Path) -> None:
    for mesh in _mesh(pki_dir, tmp_path, burst=3):
        attack = ATTACKS["RS256 header over the EC key"]
        answers = [refused(functools.partial(_ping, mesh, attack())) for _ in range(4)]
        assert answers[:3] == [(grpc.StatusCode.UNAUTHENTICATED, "BEARER_INVALID")] * 3
        assert answers[3] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": _b64(b"s" * 32), "kid": "shared"},  # HS* with a shared secret
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY)), "kid": "private"},  # a private key
    ],
)
def test_a_jwks_with_secret_or_private_keys_is_refused_at_start(jwk: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="public keys"):
        OAuth2Auth(issuer=ISSUER, audience=AUDIENCE, jwks={"keys": [jwk]}, algorithms=["RS256"])
