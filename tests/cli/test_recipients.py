"""Item 1 of issue 14: a mistyped name never becomes an account. Recipients are local
identities, contacts or 64-hex accounts; anything else is refused before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.support import Veil


def test_mistyped_recipients_are_refused_before_sending(veil: Veil) -> None:
    veil.identities("treasury", "alice", "bob", "default")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "treasury")
    veil.ok("instance", "create", "records", "--app", "vault")
    veil.ok("instance", "create", "polls", "--app", "ballot")
    before = veil.executed()
    for argv in (
        ("token", "transfer", "coins", "nobody", "1", "--as", "alice"),
        ("token", "transfer", "coins", "bobb", "1", "--as", "alice"),
        ("token", "transfer", "coins", "ab" * 31, "1", "--as", "alice"),  # not 64 hex
        ("token", "transfer", "coins", "1", "--to-account", "nobody", "--as", "alice"),
        ("token", "mint", "coins", "alcie", "5", "--as", "treasury"),
        ("vault", "share", "records", "passport", "bobb", "--as", "alice"),
        (
            "ballot",
            "create",
            "polls",
            "b",
            "--question",
            "q",
            "--option",
            "a",
            "--option",
            "b",
            "--voter",
            "alcie",
        ),
    ):
        status, out, err = veil(*argv)
        # A malformed --to-account is a command-line error (2); a name not found is not (1).
        assert status == (2 if "--to-account" in argv else 1), argv
        assert out == ""
        assert "is not a known identity or contact" in err or "is not an account" in err, err
        assert len(err.strip().splitlines()) == 1
    assert veil.executed() == before
    assert veil.json("token", "balance", "coins", "--as", "alice")["balance"] == 100


def test_contacts_and_explicit_accounts(veil: Veil) -> None:
    accounts = veil.identities("treasury", "alice")
    dana = "cd" * 32
    assert veil.json("contact", "add", "dana", dana.upper(), connect=False)["account"] == dana  # canonical
    status, _, err = veil("contact", "add", "dana", "ef" * 32, connect=False)
    assert status == 1
    assert "already exists" in err
    status, _, err = veil("contact", "add", "alice", "ef" * 32, connect=False)
    assert status == 1
    assert "already a local identity" in err
    assert "dana" in veil.ok("contact", "list", connect=False)
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    veil.ok("token", "mint", "coins", "alice", "50", "--as", "treasury")
    out = veil.ok("token", "transfer", "coins", "dana", "5", "--as", "alice")
    assert out.startswith("sent 5 to dana;")  # the name, not the hex
    out = veil.ok("token", "transfer", "coins", "3", "--to-account", "ef" * 32, "--as", "alice")
    assert f"sent 3 to {'ef' * 32};" in out
    out = veil.ok("token", "transfer", "coins", accounts["treasury"], "2", "--as", "alice")
    assert out.startswith("sent 2 to treasury;")  # a known account shows its name
    assert veil.json("token", "balance", "coins", "--as", "alice")["balance"] == 40
    veil.ok("contact", "remove", "dana", connect=False)
    status, _, err = veil("token", "transfer", "coins", "dana", "1", "--as", "alice")
    assert status == 1
    assert "'dana' is not a known identity or contact" in err


def test_vault_readers_show_names(veil: Veil, capsys: pytest.CaptureFixture[str]) -> None:
    veil.identities("alice", "bob")
    veil.ok("instance", "create", "records", "--app", "vault")
    veil.ok("vault", "put", "records", "passport", "--data", "P1", "--as", "alice")
    assert "shared record 'passport' with bob;" in veil.ok(
        "vault", "share", "records", "passport", "bob", "--as", "alice"
    )
    status, out, err = veil("vault", "get", "records", "passport", "--as", "alice")
    assert status == 0
    assert out.strip() == "P1"
    assert "shared with: bob" in err


def test_outputs_say_what_happened(veil: Veil) -> None:
    veil.identities("default", "treasury", "v1", "v2", "v3")
    assert veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury").startswith(
        "created token"
    )
    again = veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    assert "already exists" in again
    assert not again.startswith("created")
    balance = veil.ok("token", "balance", "coins", "--as", "treasury")
    assert balance.count("(") == 1  # no nested brackets
    veil.ok("instance", "create", "polls", "--app", "ballot")
    veil.ok("ballot", "create", "polls", "b", "--question", "q", "--option", "yes", "--option", "no")
    assert "vote cast for 'yes'" in veil.ok("ballot", "vote", "polls", "b", "yes", "--as", "v1")
    assert "replaced your earlier vote" in veil.ok("ballot", "vote", "polls", "b", "no", "--as", "v1")
    status, _, err = veil("ballot", "vote", "polls", "b", "maybe", "--as", "v1")
    assert status == 1
    assert "[" not in err  # no Python list
    assert "0: yes, 1: no" in err
    status, _, err = veil("token", "transfer", "coins", "default", "5", "--as", "v1")  # overdraw
    assert status == 1
    code = err.split(":")[1].strip()
    assert err.count(code) == 1, err  # the error code once


def test_attest_verify_of_a_local_quote_hints_at_the_dev_root(veil: Veil, tmp_path: Path) -> None:
    quote = tmp_path / "quote.bin"
    quote.write_bytes(veil.mesh.states[0].bundle.quote)
    status, out, err = veil("attest", "verify", str(quote), connect=False)
    assert status == 1
    assert out == ""
    assert "add --root dev" in err
    assert len(err.strip().splitlines()) == 1
    status, out, _ = veil("attest", "verify", str(quote), "--root", "dev", connect=False)
    assert status == 0
    assert "mrenclave" in out


def test_an_account_in_capitals_is_refused_with_its_lowercase_form(veil: Veil) -> None:
    veil.identities("alice")
    upper = "AB" * 32
    status, _, err = veil("token", "transfer", "coins", upper, "1", "--as", "alice")
    assert status == 1
    assert f"an account is written in lowercase: {upper.lower()}" in err
