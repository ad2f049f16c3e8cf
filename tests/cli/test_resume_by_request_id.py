"""`veil token transfer|mint --request-id`: a call the CLI left unsettled is resumed, never re-run.

A transfer the enclave refused *for now* (the host squeezed its memory budget: the sealing may
still run, security.md row 104), or one that got no answer, is kept in the data dir; the error
line names its request id, and the same command with `--request-id` resumes that very call.
"""

from __future__ import annotations

import re

import pytest

from tests.cli.support import Veil
from tests.client.test_sdk_transient_refusals import SqueezedEnclave


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
