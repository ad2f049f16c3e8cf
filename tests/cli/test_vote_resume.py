"""`veil ballot vote --request-id` against a resume with another option, another account's id,
and a settled id rerun after a later vote (which must not overwrite the counted vote's receipt);
and a failure after sending naming the call's request id, also in --json (a fresh-context
review's tests, adopted)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import Veil
from tests.client.test_request_too_large_hostile import _unopenable
from tests.client.test_sdk_transient_refusals import SqueezedEnclave
from veil.sdk.client import VeilClient
from veil.verify.errors import AttestationError


def _ballot(veil: Veil) -> None:
    veil.identities("clerk", "alice", "bob")
    veil.ok("instance", "create", "polls", "--app", "ballot")
    options = ("--option", "a", "--option", "b")
    veil.ok("ballot", "create", "polls", "chair", "--question", "q", *options, "--as", "clerk")


def _one_json(out: str) -> dict[str, Any]:
    document = json.loads(out)  # raises on two documents
    assert isinstance(document, dict)
    return document


def test_a_resume_with_another_option_is_refused_unsent_and_the_kept_vote_stands(
    veil: Veil, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ballot(veil)
    host = SqueezedEnclave(veil.mesh, monkeypatch)
    status, out, err = veil("ballot", "vote", "polls", "chair", "b", "--as", "alice", "--json")
    assert status == 1
    failed = _one_json(out)
    rid = failed["request_id"]
    assert rid
    assert f"--request-id {rid}" in err
    seen = len(host.seen)
    status, out, err = veil(
        "ballot", "vote", "polls", "chair", "a", "--as", "alice", "--request-id", rid, "--json"
    )
    assert status in (1, 2), err
    refused = _one_json(out)
    assert "another call" in refused["error"], refused
    assert "Traceback" not in err
    assert len(host.seen) == seen  # nothing sent
    host.run("polls", host.seen[0])
    resumed = veil.json("ballot", "vote", "polls", "chair", "b", "--as", "alice", "--request-id", rid)
    assert resumed["replaced"] is False


def test_another_accounts_kept_vote_id_is_refused_and_its_salt_never_sent(
    veil: Veil, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ballot(veil)
    host = SqueezedEnclave(veil.mesh, monkeypatch)
    status, _, err = veil("ballot", "vote", "polls", "chair", "b", "--as", "bob")
    assert status == 1
    rid = re.search(r"--request-id (\S+) to resume it", err)[1]  # type: ignore[index]
    seen = len(host.seen)
    status, out, err = veil(
        "ballot", "vote", "polls", "chair", "b", "--as", "alice", "--request-id", rid, "--json"
    )
    assert status != 0
    assert "another call" in _one_json(out)["error"]
    assert len(host.seen) == seen  # bob's salt never went out under alice's vote


def test_rerunning_a_settled_vote_by_id_after_a_later_vote_keeps_the_current_receipt(
    veil: Veil,
) -> None:
    """alice votes b (--request-id v1), then a (replaces it). Running the v1 command again (a
    script's retry) returns v1's recorded answer; it must not overwrite the receipt of the vote
    that counts (the salt of 'a' is nowhere else once its call left the calls store)."""
    _ballot(veil)
    veil.json("ballot", "vote", "polls", "chair", "b", "--as", "alice", "--request-id", "v1")
    current = veil.json("ballot", "vote", "polls", "chair", "a", "--as", "alice")
    assert current["replaced"] is True
    saved = Path(current["saved"])
    receipt_of_a = json.loads(saved.read_text())
    again = veil.json("ballot", "vote", "polls", "chair", "b", "--as", "alice", "--request-id", "v1")
    assert again["replaced"] is False  # v1's answer, replayed
    veil.ok("ballot", "vote", "polls", "chair", "a", "--as", "bob")
    veil.ok("ballot", "vote", "polls", "chair", "a", "--as", "clerk")
    veil.ok("ballot", "close", "polls", "chair", "--as", "clerk")
    status, _, err = veil("ballot", "verify-receipt", "polls", "chair", "--as", "alice")
    assert json.loads(saved.read_text()) == receipt_of_a, (
        "the counted vote's receipt (and salt) was overwritten"
    )
    assert status == 0, err


def test_an_attestation_failure_after_sending_still_names_the_request_id(
    veil: Veil, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host answers the transfer's first sealing 'could not open it' (ambiguous: the SDK
    keeps it and re-attests), then serves an attestation that fails. The call is kept (row 101
    (3)); the CLI's failure must still name its request id, or the user cannot resume it."""
    veil.identities("alice", "bob")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "alice")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "alice")
    honest_attest = VeilClient.attest

    def execute(self: VeilClient, sealed: object, identity: object) -> object:
        raise _unopenable()

    def attest(self: VeilClient, instance_id: str = "", *, refresh: bool = False) -> object:
        if refresh:
            raise AttestationError("the quote does not verify")
        return honest_attest(self, instance_id, refresh=refresh)

    monkeypatch.setattr(VeilClient, "_execute", execute)
    monkeypatch.setattr(VeilClient, "attest", attest)
    status, out, err = veil("token", "transfer", "coins", "bob", "5", "--as", "alice", "--json")
    assert status == 1
    document = _one_json(out)
    kept = [p.name for p in (veil.mesh.data_dir / "calls").glob("*.json")]
    assert kept, "the call was not kept"
    assert document["request_id"], f"kept call not named: {document} / {err}"
