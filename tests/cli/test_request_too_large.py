"""`veil vault put` of a record the gateway would refuse unread: one line that says nothing was
sent, and the identity's next write runs (a kept call used to wedge the account)."""

from __future__ import annotations

from pathlib import Path

from tests.cli.support import Veil
from veil.sdk.client import MAX_REQUEST_BYTES


def test_an_oversized_put_says_nothing_was_sent_and_the_next_put_runs(veil: Veil, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (MAX_REQUEST_BYTES + 1))
    veil.ok("identity", "new", "alice", connect=False)
    veil.ok("instance", "create", "notes", "--app", "vault")
    status, _, err = veil("vault", "put", "notes", "big", "--file", str(big), "--as", "alice")
    assert status == 1
    assert "nothing was sent" in err
    assert "--request-id" not in err  # nothing to resume
    assert "Traceback" not in err
    veil.ok("vault", "put", "notes", "small", "--data", "hi", "--as", "alice")
    assert "hi" in veil.ok("vault", "get", "notes", "small", "--as", "alice")


def test_a_limit_raised_past_the_gateways_leaves_no_call_behind(veil: Veil, tmp_path: Path) -> None:
    """--max-request-bytes above the gateway's limit: the gateway refuses the put unread; the
    counter is used up, nothing is kept, and the next put runs (a new-user recheck: wedged)."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (MAX_REQUEST_BYTES + 1))
    veil.ok("identity", "new", "alice", connect=False)
    veil.ok("instance", "create", "notes", "--app", "vault")
    raised = ("--max-request-bytes", str(4 * MAX_REQUEST_BYTES))
    status, _, err = veil("vault", "put", "notes", "big", "--file", str(big), "--as", "alice", *raised)
    assert status == 1
    assert "nothing ran" in err
    assert "--request-id" not in err
    veil.ok("vault", "put", "notes", "small", "--data", "hi", "--as", "alice")
