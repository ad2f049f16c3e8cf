"""The Node.js client in process: its own quote, token and receipt checks, including tampering.

The same in-process mesh as the SDK tests, reached over the gateway's public port (no client
certificate) directly or through a tampering proxy. client/node/node_modules comes from
`make setup` (npm ci); the test fails, not skips, without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.identity import SigningIdentity, new_identity
from tests.client.evil_gateway import EvilGateway, evil_gateway
from tests.conftest import REPO_ROOT
from tests.gateway.support import InProcessMesh, token_config, write_fake_mesh_policy

NODE_CLIENT = REPO_ROOT / "client" / "node"


@pytest.fixture
def funded(mesh: InProcessMesh) -> tuple[SigningIdentity, SigningIdentity]:
    alice, bob = new_identity(mesh.data_dir, "alice"), new_identity(mesh.data_dir, "bob")
    write_fake_mesh_policy(mesh.data_dir)
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        admin.token("coins", alice).mint(alice.account, 100)
    return alice, bob


@pytest.fixture
def evil(mesh: InProcessMesh) -> Iterator[tuple[EvilGateway, str]]:
    yield from evil_gateway(mesh)


def node_transfer(
    mesh: InProcessMesh, gateway: str, to: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, "Node.js is required"
    assert (NODE_CLIENT / "node_modules" / "jose").is_dir(), "run `make setup` (npm ci --prefix client/node)"
    command = [
        node, str(NODE_CLIENT / "transfer.mjs"), "--gateway", gateway, "--server-name", "localhost",
        "--data-dir", str(mesh.data_dir), "--key", str(mesh.data_dir / "identities" / "alice.key"),
        "--instance", "coins", "--to", to, "--amount", "10", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_node_client_transfers_with_verified_attestation_and_receipt(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    alice, bob = funded
    result = node_transfer(mesh, mesh.public_address, bob.account)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["account"] == alice.account
    assert document["balance"] == "90"
    assert document["counter"] == 2  # resynchronised from the enclave (the mint used counter 1)
    assert document["verified"]["tcb_status"] == "Unevaluated"
    with mesh.connect() as client:
        assert client.token("coins", bob).balance() == 10


def _flip_quote(reply: Any) -> None:
    reply.quote = reply.quote[:60] + bytes([reply.quote[60] ^ 1]) + reply.quote[61:]


def _swap_keys(reply: Any) -> None:
    reply.keys.hpke_x25519_public_key = bytes(32)


def _break_token(reply: Any) -> None:
    reply.attestation_token = reply.attestation_token[:-4] + "AAAA"


def _other_nonce(reply: Any) -> None:
    reply.nonce = bytes(len(reply.nonce))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [(_flip_quote, "quote"), (_swap_keys, "keys"), (_break_token, "token"), (_other_nonce, "report data")],
)
def test_node_client_refuses_a_tampered_bundle_and_sends_nothing(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[EvilGateway, str],
    tamper: Any,
    reason: str,
) -> None:
    servicer, address = evil
    servicer.on_attestation = tamper
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 1
    assert "attestation refused" in result.stderr
    assert reason in result.stderr
    assert servicer.calls["Execute"] == 0


def test_node_client_detects_a_tampered_response(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[EvilGateway, str]
) -> None:
    servicer, address = evil

    def flip(reply: Any) -> Any:
        sealed = reply.outcome.sealed_response
        reply.outcome.sealed_response = sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
        return reply

    servicer.on_execute = flip
    result = node_transfer(mesh, address, funded[1].account, "--counter", "2")
    assert result.returncode == 1
    assert "does not authenticate" in result.stderr


def test_node_client_refuses_another_measurement(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    policy["mrenclave"] = ["11" * 32]
    other = tmp_path / "policy.json"
    other.write_text(json.dumps(policy))
    result = node_transfer(mesh, mesh.public_address, funded[1].account, "--policy", str(other))
    assert result.returncode == 1
    assert "MRENCLAVE" in result.stderr
    assert mesh.states[0].calls["Execute"] == 1  # only the fixture's mint


def test_node_client_refuses_an_enclave_pinned_to_another_keyvault(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    policy["keyvault_release_key"] = "22" * 32
    other = tmp_path / "policy.json"
    other.write_text(json.dumps(policy))
    result = node_transfer(mesh, mesh.public_address, funded[1].account, "--policy", str(other))
    assert result.returncode == 1
    assert "another keyvault" in result.stderr
    assert mesh.states[0].calls["Execute"] == 1  # only the fixture's mint
