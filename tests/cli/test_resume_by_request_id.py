"""`veil token transfer|mint --request-id`: a call the CLI left unsettled is resumed, never re-run.

A transfer the enclave refused *for now* (the host squeezed its memory budget: the sealing may
still run, security.md row 104), or one that got no answer, is kept in the data dir; the error
line names its request id, and the same command with `--request-id` resumes that very call.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.cli.support import Veil
from tests.client.test_sdk_transient_refusals import SqueezedEnclave
from veil.sdk.client import VeilClient


def test_a_transfer_not_run_yet_is_resumed_by_its_request_id_and_runs_once(
    veil: Veil, monkeypatch: pytest.MonkeyPatch
) -> None:
    veil.identities("alice", "bob")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "alice")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "alice")
    host = SqueezedEnclave(veil.mesh, monkeypatch)
    status, _, err = veil("token", "transfer", "coins", "bob", "5", "--as", "alice")
    assert status == 1
    assert "not run so far" in err
    found = re.search(r"--request-id (\S+) to resume it", err)
    assert found, err
    host.run("coins", host.seen[0])  # the host runs the kept sealing later
    resumed = veil.json("token", "transfer", "coins", "bob", "5", "--as", "alice", "--request-id", found[1])
    assert resumed["balance"] == 95  # the one run's answer
    assert veil.json("token", "balance", "coins", "--as", "alice")["balance"] == 95


def test_a_malformed_request_id_is_refused_before_anything_is_sent(veil: Veil) -> None:
    status, _, err = veil("token", "transfer", "coins", "bob", "5", "--as", "alice", "--request-id", "x" * 65)
    assert status == 2
    assert "is not a request id" in err


@pytest.mark.parametrize(
    ("verb", "arguments"),
    [("put", ("--data", "P1234567")), ("share", ("bob",)), ("delete", ())],
)
def test_a_vault_change_not_run_yet_is_resumed_by_its_request_id(
    veil: Veil, monkeypatch: pytest.MonkeyPatch, verb: str, arguments: tuple[str, ...]
) -> None:
    """The vault's verbs name their calls too (a new-user review: a put left unsettled could not
    be resumed from the CLI, and every later write of the identity waited for it)."""
    accounts = veil.identities("alice", "bob")
    veil.ok("instance", "create", "records", "--app", "vault")
    if verb != "put":
        veil.ok("vault", "put", "records", "passport", "--data", "P1234567", "--as", "alice")
    host = SqueezedEnclave(veil.mesh, monkeypatch)
    command = ("vault", verb, "records", "passport", *arguments, "--as", "alice")
    status, _, err = veil(*command)
    assert status == 1
    found = re.search(r"--request-id (\S+) to resume it", err)
    assert found, err
    host.run("records", host.seen[0])  # the host runs the kept sealing later
    resumed = veil.json(*command, "--request-id", found[1])  # that run's answer, not a second run
    assert resumed["record_id"] == "passport"
    read = ("vault", "get", "records", "passport", "--as", "alice")
    if verb == "delete":
        assert veil(*read)[0] == 1  # gone
    else:
        record = veil.json(*read)
        assert record["readers"] == ([accounts["bob"]] if verb == "share" else [])
    if verb == "put":
        assert resumed["created"] is True  # the first run's answer
    veil.ok("vault", "put", "records", "after", "--data", "x", "--as", "alice")  # nothing waits


def test_a_vote_not_run_yet_is_resumed_by_its_request_id_with_its_own_salt(
    veil: Veil, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vote is sealed with a fresh secret salt; resumed by its id, the CLI takes the kept call's
    salt, so the very same vote goes (the SDK checks the enclave's commitment against it)."""
    veil.identities("clerk", "alice")
    veil.ok("instance", "create", "polls", "--app", "ballot")
    options = ("--option", "a", "--option", "b")
    veil.ok("ballot", "create", "polls", "chair", "--question", "q", *options, "--as", "clerk")
    host = SqueezedEnclave(veil.mesh, monkeypatch)
    status, _, err = veil("ballot", "vote", "polls", "chair", "b", "--as", "alice")
    assert status == 1
    found = re.search(r"--request-id (\S+) to resume it", err)
    assert found, err
    host.run("polls", host.seen[0])
    resumed = veil.json("ballot", "vote", "polls", "chair", "b", "--as", "alice", "--request-id", found[1])
    assert resumed["replaced"] is False  # the one vote, answered again, not a second one
    again = veil.json("ballot", "vote", "polls", "chair", "a", "--as", "alice")
    assert again["replaced"] is True  # the account goes on: a new vote replaces it


def test_ctrl_c_after_the_call_was_sent_names_it_and_the_same_id_resumes_it(
    veil: Veil, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt while waiting for the answer (the command was sent) leaves the call kept; the
    CLI says which request id resumes it (it said only "interrupted")."""
    veil.identities("alice", "bob")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "alice")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "alice")
    honest = VeilClient._execute

    def interrupted(self: VeilClient, sealed: Any, identity: Any) -> Any:
        honest(self, sealed, identity)  # it ran; the answer never reached the user
        raise KeyboardInterrupt

    monkeypatch.setattr(VeilClient, "_execute", interrupted)
    status, _, err = veil("token", "transfer", "coins", "bob", "5", "--as", "alice")
    assert status == 130
    found = re.search(r"interrupted \(run the same command with --request-id (\S+) to resume it", err)
    assert found, err
    monkeypatch.setattr(VeilClient, "_execute", honest)
    resumed = veil.json("token", "transfer", "coins", "bob", "5", "--as", "alice", "--request-id", found[1])
    assert resumed["balance"] == 95  # the one run's answer, not a second transfer
