"""`veil` keeps the OAuth2 identity's token (`--oauth2-token`, sealed only) apart from the
gateway's (`--gateway-bearer`): the old `--bearer` was both, so the token the enclave accepts went
to the gateway, which the host runs (a security review, HIGH)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.support import Veil
from tests.client.oauth2_support import (
    ENCLAVE_AUDIENCE,
    GATEWAY_AUDIENCE,
    GUARDED,
    ISSUER,
    OAuth2Mesh,
    oauth2_mesh_fixture,
)


@pytest.fixture
def world(pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OAuth2Mesh]:
    monkeypatch.delenv("VEIL_BEARER_TOKEN", raising=False)
    monkeypatch.delenv("VEIL_GATEWAY_BEARER", raising=False)
    monkeypatch.delenv("VEIL_OAUTH2_TOKEN", raising=False)
    yield from oauth2_mesh_fixture(pki_dir, tmp_path, monkeypatch)


@pytest.fixture
def veil(world: OAuth2Mesh, capsys: pytest.CaptureFixture[str]) -> Veil:
    return Veil(world.mesh, capsys)


def _create(veil: Veil, world: OAuth2Mesh, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    jwks = tmp_path / "idp-jwks.json"
    jwks.write_text(json.dumps(world.idp.jwks()))
    return veil(
        *("instance", "create", GUARDED, "--app", "vault", "--auth", "oauth2"),
        *("--oauth2-issuer", ISSUER, "--oauth2-audience", ENCLAVE_AUDIENCE, "--oauth2-jwks", str(jwks)),
        *extra,
    )


def test_the_identity_token_and_the_gateway_token_are_two(
    veil: Veil, world: OAuth2Mesh, tmp_path: Path
) -> None:
    operator = world.idp.token("operator", GATEWAY_AUDIENCE)
    status, _, err = _create(veil, world, tmp_path, "--gateway-bearer", operator, "--as", "treasury")
    assert status == 0, err
    enclave_jwt = world.idp.token("alice", ENCLAVE_AUDIENCE)
    gateway_jwt = world.idp.token("alice", GATEWAY_AUDIENCE)
    world.seen.clear()
    tokens = ("--oauth2-token", enclave_jwt, "--gateway-bearer", gateway_jwt)
    veil.ok("vault", "put", GUARDED, "passport", "--data", "P1234567", *tokens)
    assert "P1234567" in veil.ok("vault", "get", GUARDED, "passport", *tokens)
    assert world.seen
    for metadata in world.seen:
        assert metadata.get("authorization") == f"Bearer {gateway_jwt}"
        assert not any(enclave_jwt in value for value in metadata.values())


def test_the_same_token_for_both_is_refused_before_connecting(veil: Veil, world: OAuth2Mesh) -> None:
    enclave_jwt = world.idp.token("alice", ENCLAVE_AUDIENCE)
    for bearer in (enclave_jwt, world.idp.token("mallory", ENCLAVE_AUDIENCE)):
        status, _, err = veil(
            "vault", "get", GUARDED, "passport", "--oauth2-token", enclave_jwt, "--gateway-bearer", bearer
        )
        assert status == 1
        assert "gateway bearer" in err
        assert "enclave" in err
        assert "Nothing was sent" in err
    assert world.seen == []


def test_the_retired_bearer_option_and_variable_are_refused(
    veil: Veil, world: OAuth2Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = world.idp.token("alice", ENCLAVE_AUDIENCE)
    status, _, err = veil("vault", "get", GUARDED, "passport", "--bearer", token)
    assert status == 1
    assert "--oauth2-token" in err
    assert "--gateway-bearer" in err
    monkeypatch.setenv("VEIL_BEARER_TOKEN", token)
    status, _, err = veil("status")
    assert status == 1
    assert "retired" in err
    assert world.seen == []


def test_creating_an_instance_whose_enclave_accepts_the_gateway_token_is_refused(
    veil: Veil, world: OAuth2Mesh, tmp_path: Path
) -> None:
    status, _, err = _create(
        veil, world, tmp_path, "--gateway-bearer", world.idp.token("operator", ENCLAVE_AUDIENCE), "--as", "t"
    )
    assert status == 1
    assert repr(ENCLAVE_AUDIENCE) in err
    assert world.seen == []
    assert world.states_called("CreateInstance") == 0


def test_help_tells_the_two_tokens_apart(veil: Veil) -> None:
    text = " ".join(veil.ok("vault", "put", "--help", connect=False).split())
    assert "--oauth2-token JWT" in text
    assert "never sent to the gateway" in text
    assert "--gateway-bearer JWT" in text
    assert "never one the enclave accepts" in text
    assert "--bearer" not in text.replace("--gateway-bearer", "")
