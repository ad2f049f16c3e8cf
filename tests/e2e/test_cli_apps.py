"""The `veil` CLI end to end: real processes (`veil up`), one walk-through per app.

Each command is the installed `veil` binary in a subprocess, connecting to the mesh's
gateway, verifying the sim enclave against the expected measurement `veil up` wrote, and
checking every receipt.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Mesh

pytestmark = pytest.mark.e2e

VEIL = Path(sys.executable).with_name("veil")
PUBLIC_GATEWAY = "127.0.0.1:50050"


def veil(mesh: Mesh, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(VEIL), *argv, "--data-dir", str(mesh.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, f"veil {' '.join(argv)}\n{result.stdout}\n{result.stderr}"
    return result


def veil_json(mesh: Mesh, *argv: str) -> Any:
    return json.loads(veil(mesh, *argv, "--json").stdout)


def identity(mesh: Mesh, name: str) -> str:
    path = mesh.data_dir / "identities" / f"{name}.pub"
    if not path.exists():
        veil(mesh, "identity", "new", name)
    return path.read_text().strip()


def test_veil_up_writes_the_expected_measurement(mesh: Mesh) -> None:
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    assert policy["root"] == "dev"
    shown = veil_json(mesh, "attest", "show")
    assert shown["verified"] is True
    assert shown["mrenclave"] == policy["mrenclave"][0]
    human = veil(mesh, "attest", "show").stdout
    assert "TRUSTED" in human
    assert "token expires" in human


def test_token_walkthrough(mesh: Mesh, tmp_path: Path) -> None:
    accounts = {name: identity(mesh, name) for name in ("treasury", "alice", "bob", "carol")}
    veil(mesh, "instance", "create", "cli-coins", "--app", "token", "--as", "treasury")
    assert (
        veil_json(mesh, "token", "mint", "cli-coins", "alice", "500", "--as", "treasury")["total_supply"]
        == 500
    )
    sent = veil_json(mesh, "token", "transfer", "cli-coins", "bob", "120", "--as", "alice")
    assert sent["balance"] == 380
    assert sent["receipt"]["kind"] == "RECEIPT_KIND_COMMAND"
    payroll = tmp_path / "payroll.csv"
    rows = [("bob", 10), ("carol", 20), (accounts["carol"], 5)] * 4
    payroll.write_text("to,amount\n" + "".join(f"{to},{amount}\n" for to, amount in rows))
    bulk = veil(mesh, "token", "transfer", "cli-coins", "--from-csv", str(payroll), "--as", "alice")
    assert "12 transfers committed (140 tokens), 0 refused" in bulk.stdout
    assert "12/12" in bulk.stderr  # the progress bar
    assert veil_json(mesh, "token", "balance", "cli-coins", "--as", "alice")["balance"] == 240
    assert veil_json(mesh, "token", "balance", "cli-coins", "--as", "bob")["balance"] == 160
    assert veil_json(mesh, "token", "balance", "cli-coins", "--as", "carol")["balance"] == 100
    refused = veil(mesh, "token", "transfer", "cli-coins", "alice", "1000", "--as", "bob", check=False)
    assert refused.returncode == 1
    assert "error:" in refused.stderr
    listing = veil(mesh, "instance", "list").stdout
    assert "cli-coins" in listing
    assert "token" in listing


def test_vault_walkthrough(mesh: Mesh) -> None:
    accounts = {name: identity(mesh, name) for name in ("patient", "doctor")}
    veil(mesh, "instance", "create", "cli-records", "--app", "vault")
    veil(mesh, "vault", "put", "cli-records", "allergies", "--data", "penicillin", "--as", "patient")
    veil(mesh, "vault", "share", "cli-records", "allergies", "doctor", "--as", "patient")
    read = veil(mesh, "vault", "get", "cli-records", "allergies", "--owner", "patient", "--as", "doctor")
    assert read.stdout.strip() == "penicillin"
    assert veil_json(mesh, "vault", "get", "cli-records", "allergies", "--as", "patient")["readers"] == [
        accounts["doctor"]
    ]
    veil(mesh, "vault", "revoke", "cli-records", "allergies", "doctor", "--as", "patient")
    denied = veil(
        mesh, "vault", "get", "cli-records", "allergies", "--owner", "patient", "--as", "doctor", check=False
    )
    assert denied.returncode == 1
    veil(mesh, "vault", "delete", "cli-records", "allergies", "--as", "patient")
    gone = veil(mesh, "vault", "get", "cli-records", "allergies", "--as", "patient", check=False)
    assert "NOT_FOUND" in gone.stderr


def test_secret_ballot_walkthrough(mesh: Mesh) -> None:
    for name in ("clerk", "ann", "ben", "cat"):
        identity(mesh, name)
    veil(mesh, "instance", "create", "cli-polls", "--app", "ballot")
    options = ["--option", "ann", "--option", "ben"]
    voters = ["--voter", "ann", "--voter", "ben", "--voter", "cat"]
    veil(
        mesh,
        "ballot",
        "create",
        "cli-polls",
        "chair",
        "--question",
        "Who chairs?",
        *options,
        *voters,
        "--as",
        "clerk",
    )
    for voter, choice in (("ann", "ann"), ("ben", "ann"), ("cat", "ben")):
        assert (
            "vote receipt saved"
            in veil(mesh, "ballot", "vote", "cli-polls", "chair", choice, "--as", voter).stdout
        )
    stranger = veil(mesh, "ballot", "vote", "cli-polls", "chair", "ann", "--as", "clerk", check=False)
    assert "PERMISSION_DENIED" in stranger.stderr
    closed = veil(mesh, "ballot", "close", "cli-polls", "chair", "--as", "clerk").stdout
    assert "3 votes counted" in closed
    assert veil_json(mesh, "ballot", "tally", "cli-polls", "chair", "--as", "cat")["counts"] == {
        "ann": 2,
        "ben": 1,
    }
    for voter in ("ann", "ben", "cat"):
        checked = veil_json(mesh, "ballot", "verify-receipt", "cli-polls", "chair", "--as", voter)
        assert checked["counted"] is True
        assert checked["tree_size"] == 3


def test_public_port_needs_no_client_certificate_but_admin_calls_do(mesh: Mesh) -> None:
    identity(mesh, "walker")
    veil(mesh, "instance", "create", "cli-open", "--app", "vault", "--auth", "none")
    public = ["--gateway", PUBLIC_GATEWAY, "--no-client-cert"]
    # An Ed25519 identity is never downgraded to an anonymous claim on an unauthenticated instance...
    downgrade = veil(
        mesh, "vault", "put", "cli-open", "note", "--data", "x", "--as", "walker", *public, check=False
    )
    assert downgrade.returncode == 1
    assert "authenticates nobody" in downgrade.stderr
    # ...acting as a self-declared account there is explicit.
    veil(mesh, "vault", "put", "cli-open", "note", "--data", "hello", "--anonymous", "walker", *public)
    got = veil(mesh, "vault", "get", "cli-open", "note", "--anonymous", "walker", *public)
    assert got.stdout.strip() == "hello"
    refused = veil(mesh, "instance", "list", *public, check=False)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr


def test_a_client_pinned_to_another_measurement_refuses(mesh: Mesh) -> None:
    refused = veil(mesh, "attest", "show", "--mrenclave", "00" * 32, "--root", "dev", check=False)
    assert refused.returncode == 1
    assert "attestation refused" in refused.stderr
    production = veil(
        mesh, "attest", "show", "--mrenclave", "00" * 32, check=False
    )  # Intel root: sim quote fails
    assert "quote" in production.stderr


def _walkthrough(prefix: str) -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(prefix)]


def test_walkthrough_commands_run_as_documented(mesh: Mesh, tmp_path: Path) -> None:
    """README.md's `veil` lines, in order, as a newcomer runs them: in a directory whose
    .veil holds the mesh's PKI and expected measurement, and no identities yet."""
    fresh = tmp_path / ".veil"
    shutil.copytree(mesh.data_dir / "pki", fresh / "pki")
    shutil.copy(mesh.data_dir / "expected-measurement.json", fresh)
    commands = _walkthrough("veil ")
    assert len(commands) >= 15
    for argv in commands:
        command = [str(VEIL), *argv[1:]]
        result = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
        outputs = result.stdout
    assert "your vote is counted" in outputs


def test_walkthrough_grpcurl_commands_run(mesh: Mesh) -> None:
    grpcurl = Path(sys.executable).with_name("grpcurl")
    commands = _walkthrough("grpcurl ")
    assert len(commands) >= 3
    for documented in commands:
        argv = [str(grpcurl), *(a.replace(".veil/", f"{mesh.data_dir}/") for a in documented[1:])]
        result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr}"
        if "GetAttestation" in argv[-1]:  # field names: proto style via reflection, JSON style via -proto
            fields = set(json.loads(result.stdout))
            assert "quote" in fields
            assert fields & {"attestation_token", "attestationToken"}


def test_status_shows_each_instances_head_lag_from_the_keyvault(mesh: Mesh) -> None:
    """The keyvault confirms each committed head (a strict instance answers only then), so once
    the CLI has its answer the lag is 0; the JSON holds values, not the table's text."""
    identity(mesh, "treasury")
    veil(mesh, "instance", "create", "cli-status", "--app", "token", "--as", "treasury")
    veil(mesh, "token", "mint", "cli-status", "treasury", "5", "--as", "treasury")
    rows = {row["service"]: row for row in veil_json(mesh, "status")["services"]}
    status = rows["instance cli-status"]
    assert status["head"] >= 2  # genesis and the mint
    assert status["head_lag"] == 0
    assert status["health"] is None  # "-" in the table
    assert status["measurement"] is None
    state = rows["state"]  # veil up runs one state replica
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    assert state["measurement"] == policy["mrenclave"][0]  # whole, not the table's 16 characters
    assert rows["keyvault"]["health"] == "SERVING"
    table = veil(mesh, "status").stdout
    (line,) = [row for row in table.splitlines() if row.startswith("instance cli-status")]
    assert line.split()[-2:] == [str(status["head"]), "0"]  # HEAD, HEAD LAG (no detail)
