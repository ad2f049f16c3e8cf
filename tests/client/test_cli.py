"""The `veil` CLI against an in-process mesh: each command, human and --json output, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.support import Veil
from tests.gateway.support import InProcessMesh


@pytest.fixture
def veil(mesh: InProcessMesh, capsys: pytest.CaptureFixture[str]) -> Veil:
    return Veil(mesh, capsys)


def _identities(veil: Veil, *names: str) -> dict[str, str]:
    accounts = {}
    for name in names:
        status, out, _ = veil("identity", "new", name, "--json", connect=False)
        assert status == 0
        accounts[name] = json.loads(out)["account"]
    return accounts


def test_identity_commands(veil: Veil) -> None:
    accounts = _identities(veil, "alice")
    status, out, _ = veil("identity", "show", "alice", connect=False)
    assert status == 0
    assert accounts["alice"] in out
    status, out, _ = veil("identity", "list", connect=False)
    assert "alice" in out
    assert "ACCOUNT" in out
    status, _, err = veil("identity", "new", "alice", connect=False)
    assert status == 1
    assert "already exists" in err


def test_token_walkthrough_with_bulk_csv(veil: Veil, tmp_path: Path) -> None:
    accounts = _identities(veil, "issuer", "alice", "bob", "carol")
    status, out, _ = veil("instance", "create", "coins", "--app", "token", "--as", "issuer")
    assert status == 0, out
    assert "created token instance 'coins'" in out
    assert veil.json("token", "mint", "coins", "alice", "100", "--as", "issuer")["total_supply"] == 100
    sent = veil.json("token", "transfer", "coins", "bob", "30", "--as", "alice")
    assert sent["balance"] == 70
    assert sent["receipt"]["kind"] == "RECEIPT_KIND_COMMAND"
    status, out, _ = veil("token", "balance", "coins", "--as", "bob")
    assert status == 0
    assert out.startswith("30")
    assert "receipt verified" in out

    csv_file = tmp_path / "payroll.csv"
    csv_file.write_text(f"to,amount\nbob,5\ncarol,7\n{accounts['carol']},3\n# done\n")
    status, out, err = veil("token", "transfer", "coins", "--from-csv", str(csv_file), "--as", "alice")
    assert status == 0, err
    assert "3 transfers committed (15 tokens)" in out
    assert "3/3" in err  # the progress bar, on stderr
    assert veil.json("token", "balance", "coins", "--as", "carol")["balance"] == 10
    assert veil.json("token", "supply", "coins", "--as", "carol")["total_supply"] == 100

    csv_file.write_text("bob,1\nbob,1000\n")
    status, out, err = veil("token", "transfer", "coins", "--from-csv", str(csv_file), "--as", "alice")
    assert status == 1  # one transfer was refused (overdraw), the other committed
    assert "1 transfers committed (1 tokens), 1 refused" in out


def test_vault_walkthrough(veil: Veil, tmp_path: Path) -> None:
    accounts = _identities(veil, "alice", "bob")
    assert veil("instance", "create", "records", "--app", "vault")[0] == 0
    status, out, _ = veil("vault", "put", "records", "passport", "--data", "P1234567", "--as", "alice")
    assert status == 0
    assert "created record 'passport'" in out
    assert veil("vault", "share", "records", "passport", "bob", "--as", "alice")[0] == 0
    status, out, _ = veil("vault", "get", "records", "passport", "--owner", "alice", "--as", "bob")
    assert status == 0
    assert out.strip() == "P1234567"
    document = veil.json("vault", "get", "records", "passport", "--as", "alice")
    assert document["readers"] == [accounts["bob"]]
    assert veil("vault", "revoke", "records", "passport", "bob", "--as", "alice")[0] == 0
    status, _, err = veil("vault", "get", "records", "passport", "--owner", "alice", "--as", "bob")
    assert status == 1
    assert "error:" in err
    source = tmp_path / "scan.bin"
    source.write_bytes(bytes(range(256)))
    assert veil("vault", "put", "records", "scan", "--file", str(source), "--as", "alice")[0] == 0
    target = tmp_path / "out.bin"
    assert veil("vault", "get", "records", "scan", "--out", str(target), "--as", "alice")[0] == 0
    assert target.read_bytes() == bytes(range(256))
    assert veil("vault", "delete", "records", "scan", "--as", "alice")[0] == 0


def test_ballot_walkthrough(veil: Veil) -> None:
    _identities(veil, "chair", "v1", "v2", "v3")
    assert veil("instance", "create", "polls", "--app", "ballot")[0] == 0
    voters = ["--voter", "v1", "--voter", "v2", "--voter", "v3"]
    question = ["--question", "Adopt the budget?", "--option", "yes", "--option", "no"]
    status, out, _ = veil("ballot", "create", "polls", "budget", *question, *voters, "--as", "chair")
    assert status == 0
    assert "3 eligible voters" in out
    for voter, choice in (("v1", "yes"), ("v2", "no"), ("v3", "0")):
        status, out, err = veil("ballot", "vote", "polls", "budget", choice, "--as", voter)
        assert status == 0, err
        assert "vote receipt saved" in out
    status, out, err = veil("ballot", "vote", "polls", "budget", "yes", "--as", "v3")  # same choice again
    assert status == 0, err
    assert "replaced your earlier vote" in out
    status, _, err = veil(
        "ballot", "create", "polls", "quorum", *question, *voters, "--min-votes", "4", "--as", "chair"
    )
    assert status == 1
    assert "needs 4 votes" in err
    status, _, err = veil("ballot", "tally", "polls", "budget", "--as", "v1")
    assert status == 1
    assert "still open" in err
    status, out, _ = veil("ballot", "close", "polls", "budget", "--as", "chair")
    assert status == 0
    assert "Adopt the budget?" in out
    assert "3 votes counted" in out
    assert veil.json("ballot", "tally", "polls", "budget", "--as", "v2")["counts"] == {"yes": 2, "no": 1}
    status, out, err = veil("ballot", "verify-receipt", "polls", "budget", "--as", "v2")
    assert status == 0, err
    assert "your vote is counted" in out
    assert veil.json("ballot", "verify-receipt", "polls", "budget", "--as", "v1")["counted"] is True


def test_instance_list_and_attest_show(veil: Veil) -> None:
    _identities(veil, "default")
    assert veil("instance", "create", "notes", "--app", "vault", "--auth", "none")[0] == 0
    status, out, _ = veil("instance", "list")
    assert status == 0
    assert "notes" in out
    assert "vault" in out
    assert "none" in out
    status, out, _ = veil("attest", "show", "--instance", "notes")
    assert status == 0
    for expected in ("TRUSTED", "MRENCLAVE", "TCB status: Unevaluated", "token expires", "checked:", "✓"):
        assert expected in out
    document = veil.json("attest", "show")
    assert document["verified"] is True
    assert (
        document["mrenclave"]
        == json.loads((veil.mesh.data_dir / "expected-measurement.json").read_text())["mrenclave"][0]
    )


def test_wrong_measurement_fails_closed(veil: Veil) -> None:
    status, out, err = veil("attest", "show", "--mrenclave", "ab" * 32, "--root", "dev")
    assert status == 1
    assert out == ""
    assert "attestation refused" in err
    assert "MRENCLAVE" in err
    status, _, err = veil("attest", "show", "--policy", str(veil.mesh.data_dir / "absent.json"))
    assert status == 1
    assert "absent.json does not exist" in err


def test_without_a_policy_nothing_connects(veil: Veil) -> None:
    (veil.mesh.data_dir / "expected-measurement.json").unlink()
    status, _, err = veil("attest", "show")
    assert status == 1
    assert "no expected measurement" in err
    assert veil.mesh.states[0].calls["GetAttestation"] == 0
