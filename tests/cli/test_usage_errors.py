"""A command line that is wrong exits 2, also when only the command can tell (arguments that
exclude each other, one missing), and with --json every failure is one JSON document on stdout
as well as the `error:` line (a new-user review: these exited 1, and --json failed in text)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.support import Veil


def _usage(veil: Veil, *argv: str, connect: bool = True) -> str:
    status, out, err = veil(*argv, connect=connect)
    assert status == 2, (argv, out, err)
    assert err.startswith("error: ") or "error:" in err, err
    assert "Traceback" not in err
    return err


def test_arguments_the_parser_cannot_judge_exit_2_and_send_nothing(veil: Veil, tmp_path: Path) -> None:
    veil.identities("alice", "bob")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "alice")
    sent = veil.executed()
    assert "give TO AMOUNT" in _usage(veil, "token", "transfer", "coins", "--as", "alice")
    assert "give the AMOUNT" in _usage(veil, "token", "transfer", "coins", "bob", "--as", "alice")
    payroll = tmp_path / "payroll.csv"
    payroll.write_text("to,amount\nbob,1\n")
    csv_and_recipient = (
        "token",
        "transfer",
        "coins",
        "bob",
        "5",
        "--from-csv",
        str(payroll),
        "--as",
        "alice",
    )
    assert "give no TO or AMOUNT" in _usage(veil, *csv_and_recipient)
    account = "cd" * 32
    assert "not an amount" in _usage(veil, "token", "transfer", "coins", "abc", "--to-account", account)
    assert "not an account" in _usage(veil, "token", "transfer", "coins", "5", "--to-account", "zz")
    assert veil.executed() == sent


def test_a_token_instance_without_an_issuer_says_how_to_name_one(veil: Veil) -> None:
    err = _usage(veil, "instance", "create", "coins", "--app", "token")
    assert "--as NAME" in err
    assert "veil identity new" in err


def test_identity_names_are_judged_by_the_parser(veil: Veil) -> None:
    for bad in ("../x", "alice\n", "-", "a" * 65):
        assert "identity names are" in _usage(veil, "identity", "new", bad, connect=False)
    assert not (veil.mesh.data_dir / "identities" / "alice\n.key").exists()


def test_with_json_a_failure_is_one_json_document_too(veil: Veil) -> None:
    veil.identities("alice")
    status, out, err = veil("token", "transfer", "coins", "--as", "alice", "--json")
    assert status == 2
    assert json.loads(out) == {
        "error": err.strip().removeprefix("error: "),
        "exit_status": 2,
        "request_id": None,
    }
    status, out, _ = veil("token", "balance", "nope", "--as", "alice", "--json")
    assert status == 1
    document = json.loads(out)
    assert document["exit_status"] == 1
    assert "nope" in document["error"]


def test_with_json_a_refusal_of_the_parser_is_one_json_document_too(veil: Veil) -> None:
    for argv in (
        ("identity", "new", "../x"),
        ("token", "mint", "coins", "alice", "abc"),
        ("token", "transfer"),
    ):
        status, out, err = veil(*argv, "--json", connect=False)
        assert status == 2
        document = json.loads(out)
        assert document["exit_status"] == 2
        assert document["error"] == err.strip().removeprefix("error: ")
