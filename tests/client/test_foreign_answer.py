"""An answer no sealing of a call opens (ForeignAnswer) and the counter it leaves (a review of
the change that uses that counter up with the app's read-only filler).

The counter can be used up only when the filler gets an answer: when it cannot be now, the call
is kept and raised as NotSettledYet (resumable, "stopped" in a CSV), never as a dropped call a
CSV records as "unknown" and never resumes (which left the account stuck behind it). A forged
answer to a gap filler whose counter a second filler then used is a filled gap, not CounterGap.
The calls store checks and writes an id's entry in one step, so a call never overwrites or
deletes another call's entry under the same id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.client.test_sdk_batch_hostile import BOB, Down, _hosts_word, _pay, alice, coins
from tests.client.test_shared_request_id import _balance, bob
from tests.gateway.support import InProcessMesh
from veil.cli.token import Journal, Row, _bulk_chunk
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.calls import FileCalls, MemoryCalls, PendingCall
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import CounterGap
from veil.sdk.identity import SigningIdentity
from veil.status import StatusError

__all__ = ["alice", "bob", "coins"]  # the fixtures, shared with the tests they came from


def too_large() -> StatusError:
    """The gateway's "refused unread, too large" (RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE), as a
    hostile host may say it of any request."""
    info = error_details_pb2.ErrorInfo(reason="MESSAGE_TOO_LARGE", metadata={"limit_bytes": "1048576"})
    status = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="too large")
    status.details.add().Pack(info)
    return StatusError(status)


def _forged() -> gateway_pb2.ExecuteResponse:
    """An answer no sealing opens (the host's forgery): a ForeignAnswer to the client."""
    return gateway_pb2.ExecuteResponse(
        outcome=envelope_pb2.CommandOutcome(sealed_response=b"\x00" * 64, accepted=False)
    )


class _Stub:
    """A gateway stub whose Execute and ExecuteBatch are scripted per test."""

    def __init__(self, real: Any, execute: Any, batch: Any = None) -> None:
        self.real, self._execute, self._batch = real, execute, batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def Execute(self, request: Any, **kw: Any) -> Any:
        return self._execute(self.real, request, **kw)

    def ExecuteBatch(self, request: Any, **kw: Any) -> Any:
        if self._batch is None:
            return self.real.ExecuteBatch(request, **kw)
        return self._batch(self.real, request, **kw)


def test_a_foreign_answer_whose_filler_gets_no_answer_does_not_wedge_a_csv(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, tmp_path: Path
) -> None:
    """A CSV chunk (three rows of 10) whose batch gets no answer; row 1, resent alone, gets a
    forged answer, and the filler sent to use its counter up gets no answer either (the host's
    unsealed word). Row 1 is kept (its sealing valid) and "stopped", like the rows after it; the
    host is honest from then on, and two reruns get the file through and the account goes on."""
    rows = [Row(n, "bob", BOB, 10) for n in (1, 2, 3)]
    journal_path = tmp_path / "journal.json"
    state = {"phase": "hostile"}

    def batch(real: Any, request: Any, **kw: Any) -> Any:
        if state["phase"] == "hostile":
            raise Down()  # the batch never reaches the enclave
        return real.ExecuteBatch(request, **kw)

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if state["phase"] == "hostile":
            if request.request_id.endswith("-1"):
                return _forged()  # row 1: an answer no sealing opens
            if not request.request_id.startswith("csv-"):
                return _hosts_word()  # the filler: the host's unsealed word
        return real.Execute(request, **kw)

    with mesh.connect(timeout=1.0) as client:
        client._stub = _Stub(client._stub, execute, batch)  # type: ignore[assignment]
        token = client.token(coins, alice)
        journal = Journal(journal_path, "f" * 64, alice.account)
        first = _bulk_chunk(token, journal, rows)
        journal.save()
        assert [r["status"] for r in first] == ["stopped", "stopped", "stopped"], first
        kept = client.calls.get(journal.request_id(rows[0]))
        assert kept is not None  # row 1 is kept, its sealing valid: resumed, never sealed anew
        assert kept.sealings

        state["phase"] = "honest"
        for _ in range(2):  # the user runs the file again, twice, against an honest mesh
            journal = Journal(journal_path, "f" * 64, alice.account)
            again = _bulk_chunk(token, journal, rows)
            journal.save()
        statuses = [r["status"] for r in again]
        try:
            client.execute(coins, _pay(1), alice)
            next_call = "ran"
        except CounterGap as gap:
            next_call = f"CounterGap: {gap}"
    assert "stopped" not in statuses, statuses
    assert next_call == "ran", next_call


@pytest.mark.parametrize("lie", ["forged answer", "too large"])
def test_a_lie_to_a_filler_does_not_fail_a_call_whose_gap_was_filled(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, lie: str
) -> None:
    """A call sealed above an unused counter with nothing kept for it (a crash after the mark
    was raised) fills the gap with the read-only filler. The host forges the filler's answer, or
    says it was too large (RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE); a second filler uses the gap
    up, and the call runs (it was CounterGap though nothing blocked it)."""
    lied: list[str] = []

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if not lied and request.request_id != "pay-1":
            lied.append(request.request_id)
            if lie == "too large":
                raise too_large()
            return _forged()  # the first filler's answer
        return real.Execute(request, **kw)

    with mesh.connect(timeout=2.0, calls=MemoryCalls(), counters=MemoryCounters()) as client:
        client.counters.record(coins, alice.account, 1)
        client.counters.seal(coins, alice.account, 2)  # counter 2 sealed, its call lost in a crash
        client._stub = _Stub(client._stub, execute)  # type: ignore[assignment]
        try:
            outcome: Any = client.execute(coins, _pay(5), alice, request_id="pay-1")
        except CounterGap as gap:
            outcome = gap
    assert lied, "no filler was sent"
    assert not isinstance(outcome, CounterGap), f"spurious CounterGap after the gap was used: {outcome}"
    assert _balance(mesh, alice) == 995


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_the_calls_store_never_overwrites_or_deletes_another_calls_entry(
    mesh: InProcessMesh, alice: SigningIdentity, bob: SigningIdentity, kind: str
) -> None:
    """Two calls under one id (alice's and bob's "inv-42"): the first kept owns the entry; the
    other's keep is refused and its forget leaves the owner's entry in place (a review found
    bob's dropped call deleting alice's kept one, and her retry then sealing her transfer anew
    while the host held the first sealing: paid twice)."""
    store: Any = FileCalls(mesh.data_dir / "calls") if kind == "file" else MemoryCalls()
    alices = PendingCall("coins", "inv-42", 2, _pay(30).SerializeToString(), account=alice.account)
    bobs = PendingCall("coins", "inv-42", 3, _pay(50).SerializeToString(), account=bob.account)
    assert store.keep(alices)
    assert not store.keep(bobs)
    store.forget_call(bobs)
    kept = store.get("inv-42")
    assert kept is not None
    assert kept.account == alice.account
    moved = PendingCall("coins", "inv-42", 5, _pay(30).SerializeToString(), account=alice.account)
    assert store.keep(moved)  # the same call, under another counter (another process moved it on)
    store.forget_call(alices)
    assert store.get("inv-42") is None
