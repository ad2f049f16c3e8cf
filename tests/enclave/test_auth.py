"""Authorization inside the enclave: none, Ed25519 signatures and OAuth2 JWTs (minted by PyJWT,
an independent implementation, and checked by the enclave's own verifier)."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.enclave.support import NOW_MS, Harness, config, error_code, vault
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2
from veil.sdk.sealing import SealedRequest, seal_plaintext, signing_bytes
from veil.services.state.enclave_host import EnclaveCallError

ISSUER, AUDIENCE = "https://login.example", "veil"
PUT = vault(put=apps_pb2.VaultPut(record_id="r", data=b"d"))
NOW_S = NOW_MS // 1000


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> str:
    rsa_jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    return json.dumps({"keys": [rsa_jwk | {"kid": "r1", "use": "sig"}, ec_jwk | {"kid": "e1"}]})


def _token(key: Any, alg: str = "RS256", kid: str = "r1", **overrides: Any) -> str:
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "exp": NOW_S + 60,
        "nbf": NOW_S - 60,
    } | overrides
    claims = {k: v for k, v in claims.items() if v is not None}
    return pyjwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def _unsigned_token() -> str:
    """An alg=none token: header and claims, empty signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": NOW_S + 9}
    return f"{part({'alg': 'none'})}.{part(claims)}."


@pytest.fixture
def oauth(harness: Harness, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Harness:
    harness.create(
        "o",
        config(
            auth=envelope_pb2.AUTH_SCHEME_OAUTH2,
            oauth2_issuer=ISSUER,
            oauth2_audience=AUDIENCE,
            oauth2_jwks_json=_jwks(rsa_key, ec_key),
        ),
    )
    return harness


def test_oauth2_rs256_and_es256_tokens_authorize_their_subject(
    oauth: Harness, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    client = oauth.client("o", jwt=_token(rsa_key))
    assert error_code(oauth.call(client, PUT)) == "OK"
    client.jwt = _token(ec_key, "ES256", "e1", aud=[AUDIENCE, "other"])  # same sub: same account and counter
    assert error_code(oauth.call(client, PUT)) == "OK"
    got = oauth.query(client, vault(get=apps_pb2.VaultGet(owner="user-42", record_id="r")))
    assert got.result.vault.get.data == b"d"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda r, e: _token(r, exp=NOW_S - 1), "expired"),
        (lambda r, e: _token(r, exp=None), "exp"),
        (lambda r, e: _token(r, exp=float("inf")), "Infinity is not allowed"),  # "Infinity" never expires
        (lambda r, e: _token(r, nbf=NOW_S + 60), "not yet valid"),
        (lambda r, e: _token(r, iss="https://evil.example"), "issuer"),
        (lambda r, e: _token(r, aud="someone-else"), "audience"),
        (lambda r, e: _token(r, sub=None), "subject"),
        (lambda r, e: _token(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "signature"),
        (lambda r, e: _token(e, "ES256", "r1"), "signature"),  # kid of the RSA key, EC signature
        (lambda r, e: _token(b"k" * 32, "HS256"), "algorithm"),
        (lambda r, e: _unsigned_token(), "algorithm"),
        (lambda r, e: _token(r)[:-4] + "AAAA", "signature"),
        (lambda r, e: "not.a.jwt.at.all", "compact"),
    ],
)
def test_oauth2_bad_tokens_are_refused_and_change_nothing(
    oauth: Harness, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, make: Any, reason: str
) -> None:
    before = oauth.enclave.state_digest()
    client = oauth.client("o", jwt=make(rsa_key, ec_key))
    sealed = client.seal(PUT)
    (outcome,) = oauth.run("o", sealed)
    result = client.read(sealed, outcome)
    assert error_code(result) == "UNAUTHENTICATED"
    assert reason in result.error.message
    # Only the host's clock decides expiry: that refusal says the same sealing may run later.
    assert result.may_run_later == (reason in ("expired", "not yet valid"))
    assert not outcome.accepted
    assert oauth.enclave.state_digest() == before


def test_a_token_refused_at_the_hosts_time_runs_at_another(
    oauth: Harness, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Why a clock refusal is not final: a host that moves its clock past a token's expiry gets a
    genuine refusal, then runs the same sealing with its clock back (issue 11, row 104)."""
    client = oauth.client("o", jwt=_token(rsa_key))
    sealed = client.seal(PUT)
    (refused,) = oauth.execute("o", [sealed.command], now_ms=NOW_MS + 3_600_000).outcomes
    assert client.read(sealed, refused).may_run_later
    (ran,) = oauth.execute("o", [sealed.command]).outcomes
    assert ran.accepted


def test_oauth2_instance_refuses_a_bad_jwks(harness: Harness) -> None:
    harness.provision("o2")
    for jwks in ("{}", '{"keys": []}', "not json", '{"keys": [{"kty": "oct", "k": "AAAA"}]}'):
        bad = config(
            auth=envelope_pb2.AUTH_SCHEME_OAUTH2,
            oauth2_issuer=ISSUER,
            oauth2_audience=AUDIENCE,
            oauth2_jwks_json=jwks,
        )
        with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT"):
            harness.create_raw("o2", bad)


def test_signature_scheme_account_is_the_key_and_other_keys_are_refused(harness: Harness) -> None:
    harness.create("s", config(auth=envelope_pb2.AUTH_SCHEME_SIGNATURE))
    key = ed25519.Ed25519PrivateKey.generate()
    client = harness.client("s", signer=key)
    assert error_code(harness.call(client, PUT)) == "OK"
    got = harness.query(client, vault(get=apps_pb2.VaultGet(owner=client.identity, record_id="r")))
    assert got.result.vault.get.data == b"d"

    before = harness.enclave.state_digest()
    # Claim the victim's public key, sign with another key.
    command = command_pb2.Command(
        instance_id="s",
        counter=client.counter + 1,
        request_id="r-1",
        response_key=bytes(32),
        call=PUT.SerializeToString(),
    )
    command.auth.signature.public_key = key.public_key().public_bytes_raw()
    command.auth.signature.signature = ed25519.Ed25519PrivateKey.generate().sign(signing_bytes(command))
    sealed = SealedRequest(
        "s",
        "r-1",
        command.counter,
        client.identity,
        bytes(32),
        seal_plaintext(harness.keys, command.SerializeToString(), instance_id="s"),
    )
    (outcome,) = harness.run("s", sealed)
    assert error_code(client.read(sealed, outcome)) == "UNAUTHENTICATED"
    assert harness.enclave.state_digest() == before


def test_proof_kind_must_match_the_scheme(harness: Harness) -> None:
    harness.create("s", config(auth=envelope_pb2.AUTH_SCHEME_SIGNATURE))
    anonymous = harness.client("s", account="alice")
    assert error_code(harness.call(anonymous, PUT)) == "UNAUTHENTICATED"
