"""The any-language proof: the Node.js client (clients/node) against a real mesh.

It connects over TLS without a client certificate (the gateway's public port), verifies the
quote against the dev root (Intel's QE identity, the report data binding the enclave's keys),
the keyvault token against the JWKS the dev policy pins, the expected measurement and the
instance's enclave-signed descriptor, seals a token transfer with HPKE and an Ed25519 proof
under the descriptor's auth scheme, and checks the receipt. Its npm packages are installed by
`make setup` (`npm ci` in clients/node); nothing is downloaded here.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.client.node_support import NODE_CLIENT, run_node
from tests.e2e.conftest import Mesh
from veil import connect, load_policy
from veil.dev.loadclient import token_config_for
from veil.sdk.identity import new_identity

pytestmark = pytest.mark.e2e

PUBLIC_GATEWAY = "127.0.0.1:50050"


def _transfer(
    mesh: Mesh, *extra: str, to: str, key: Path, amount: int = 7
) -> subprocess.CompletedProcess[str]:
    return run_node(
        str(NODE_CLIENT / "transfer.mjs"),
        "--gateway", PUBLIC_GATEWAY, "--server-name", "localhost",
        "--data-dir", str(mesh.data_dir), "--key", str(key),
        "--instance", "node-coins", "--to", to, "--amount", str(amount), *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def funded(mesh: Mesh) -> dict[str, Any]:
    """A token instance where the Node client's identity holds 100 tokens."""
    issuer = new_identity(mesh.data_dir, "node-issuer", force=True)
    payee = new_identity(mesh.data_dir, "node-payee", force=True)
    pki = mesh.data_dir / "pki"
    with connect(
        mesh.gateway,
        policy=load_policy(mesh.data_dir / "expected-measurement.json"),
        ca=pki / "ca.pem",
        cert=pki / "admin.pem",
        key=pki / "admin-key.pem",
        data_dir=mesh.data_dir,
    ) as client:
        _, descriptor = client.create_instance(
            "node-coins",
            token_config_for(issuer.public_key),
        )
        client.token("node-coins", issuer).mint(issuer.account, 100)
    return {
        "issuer": issuer,
        "payee": payee,
        "key": mesh.data_dir / "identities" / "node-issuer.key",
        "descriptor": descriptor,
    }


def _balance(mesh: Mesh, who: Any) -> int:
    pki = mesh.data_dir / "pki"
    with connect(  # no client certificate: the public port
        PUBLIC_GATEWAY,
        policy=load_policy(mesh.data_dir / "expected-measurement.json"),
        ca=pki / "ca.pem",
        data_dir=mesh.data_dir,
    ) as client:
        balance: int = client.token("node-coins", who).balance()
        return balance


def test_node_client_verifies_seals_a_transfer_and_checks_the_receipt(
    mesh: Mesh, funded: dict[str, Any]
) -> None:
    result = _transfer(mesh, to=funded["payee"].account, key=funded["key"])
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    verified = document["verified"]
    assert verified["mrenclave"] in policy["mrenclave"]
    # The dev policy restricts the TCB status, so it pins the keyvault's JWKS, which verified the token.
    assert verified["jwks_pinned"] is True
    assert verified["tcb_status"] in policy["accepted_tcb_statuses"]
    assert verified["instance"] == {
        "instance_id": "node-coins",
        "config_hash": funded["descriptor"].config_hash.hex(),
        "genesis_hash": funded["descriptor"].genesis_hash.hex(),
        "auth_scheme": "AUTH_SCHEME_SIGNATURE",
    }
    assert document["balance"] == "93"
    assert len(document["receipt"]["signature"]) == 128
    assert _balance(mesh, funded["payee"]) == 7


def _refused_under_policy(
    mesh: Mesh, funded: dict[str, Any], tmp_path: Path, change: Callable[[dict[str, Any]], object]
) -> str:
    """A transfer under the local policy with `change` made to it: refused (exit 1) before
    anything moved. Returns what the client said on stderr."""
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    change(policy)
    changed = tmp_path / "changed-policy.json"
    changed.write_text(json.dumps(policy))
    before = _balance(mesh, funded["payee"])
    result = _transfer(mesh, "--policy", str(changed), to=funded["payee"].account, key=funded["key"])
    assert result.returncode == 1
    assert _balance(mesh, funded["payee"]) == before
    return result.stderr


def test_node_client_refuses_another_measurement_and_sends_nothing(
    mesh: Mesh, funded: dict[str, Any], tmp_path: Path
) -> None:
    said = _refused_under_policy(mesh, funded, tmp_path, lambda policy: policy.update(mrenclave=["00" * 32]))
    assert "attestation refused" in said
    assert "MRENCLAVE" in said


def test_node_client_refuses_a_restricting_policy_without_a_pinned_jwks(
    mesh: Mesh, funded: dict[str, Any], tmp_path: Path
) -> None:
    # Without it, the token's TCB status would rest on the gateway's JWKS.
    said = _refused_under_policy(mesh, funded, tmp_path, lambda policy: policy.pop("jwks"))
    assert "policy refused" in said
    assert "must pin jwks" in said
