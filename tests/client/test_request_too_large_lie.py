"""A host that answers RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE (a lie) to a sealing it holds,
then runs that sealing before or after the client's filler, in a single call and in a batch. A
command must never run twice, a command that ran must never be reported "nothing ran", and the
account must go on (a fresh-context review's tests, adopted)."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.client.test_foreign_answer import _Stub
from tests.client.test_sdk_batch_hostile import _pay, alice, coins
from tests.client.test_shared_request_id import _balance
from tests.gateway.support import InProcessMesh
from veil.sdk.errors import CounterGap, OutcomeUnknown, RequestTooLarge, VeilClientError
from veil.sdk.identity import SigningIdentity
from veil.status import StatusError

__all__ = ["alice", "coins"]


def _too_large() -> StatusError:
    """The gateway's 'refused unread, too large' (here the host's lie)."""
    info = error_details_pb2.ErrorInfo(reason="MESSAGE_TOO_LARGE", metadata={"limit_bytes": "1048576"})
    status = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="too large")
    status.details.add().Pack(info)
    return StatusError(status)


def test_held_sealing_run_before_the_filler_is_reported_as_run_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    held: list[Any] = []

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.request_id == "p1":
            held.append(request)
            raise _too_large()
        if held and not getattr(execute, "ran", False):
            execute.ran = True  # type: ignore[attr-defined]
            real.Execute(held[0], **kw)  # the host runs the held sealing first
        return real.Execute(request, **kw)

    with mesh.connect(timeout=2.0) as client:
        hostile = _Stub(client._stub, execute)
        client._stub = hostile  # type: ignore[assignment]
        opened = client.execute(coins, _pay(10), alice, request_id="p1")
        assert opened.accepted  # it ran: reported as run, never "nothing ran"
        client._stub = hostile.real
        again = client.execute(coins, _pay(10), alice, request_id="p1")
        assert again.accepted
        client.execute(coins, _pay(1), alice)
    assert _balance(mesh, alice) == 989


def test_held_sealing_run_after_the_filler_never_runs(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    held: list[Any] = []

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.request_id == "p1":
            held.append(request)
            raise _too_large()
        return real.Execute(request, **kw)

    with mesh.connect(timeout=2.0) as client:
        hostile = _Stub(client._stub, execute)
        client._stub = hostile  # type: ignore[assignment]
        with pytest.raises(RequestTooLarge, match="nothing ran"):
            client.execute(coins, _pay(10), alice, request_id="p1")
        real = hostile.real
        client._stub = real
        for request in held:
            real.Execute(request)  # the host runs the held sealing now: refused, its counter used
        client.execute(coins, _pay(1), alice)
        # The same id again: a new call (the old one was dropped as "nothing ran"): the mesh's
        # record under p1 is a refusal of the old sealing -> never a second run of anything.
        with contextlib.suppress(VeilClientError):
            client.execute(coins, _pay(10), alice, request_id="p1")
    assert _balance(mesh, alice) in (999, 989)  # at most one 10 ran, and only if the rerun ran it


def test_batch_lied_too_large_then_host_runs_two_held_sealings_before_the_filler(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Three transfers (10, 20, 30) in one batch. The host says the whole batch is too large
    (holding its sealings), then lies 'too large' to b1 resent alone; before b1's filler it runs
    b1 and b2 from the held batch. b1 must not be reported 'nothing ran'."""
    batch_held: list[Any] = []
    state = {"filler_seen": False}

    def batch(real: Any, request: Any, **kw: Any) -> Any:
        batch_held.extend(request.commands)
        raise _too_large()

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.request_id == "b1":
            raise _too_large()
        if request.request_id not in ("b1", "b2", "b3") and not state["filler_seen"]:  # the filler
            state["filler_seen"] = True
            for held in batch_held[:2]:  # b1 then b2, under their counters
                real.Execute(held, **kw)
        return real.Execute(request, **kw)

    with mesh.connect(timeout=2.0) as client:
        hostile = _Stub(client._stub, execute, batch)
        client._stub = hostile  # type: ignore[assignment]
        results = client.execute_many(
            coins, [_pay(10), _pay(20), _pay(30)], alice, request_ids=["b1", "b2", "b3"]
        )
        first = results[0]
        assert not (isinstance(first, RequestTooLarge) and first.sent), f"b1 ran, reported: {first}"
        assert isinstance(first, OutcomeUnknown) or getattr(first, "accepted", False), first
        client._stub = hostile.real
        # Resume everything by id: nothing runs twice.
        for amount, rid in ((10, "b1"), (20, "b2"), (30, "b3")):
            with contextlib.suppress(OutcomeUnknown, CounterGap):
                client.execute(coins, _pay(amount), alice, request_id=rid)
    assert _balance(mesh, alice) == 1000 - 60


def test_a_gap_filler_lied_too_large_is_a_filled_gap_not_counter_gap(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """A call sealed above an unused counter nothing keeps (a crash after the mark was raised):
    the SDK fills the gap. The host answers the filler 'too large' (a lie); the SDK uses the
    counter up with a second filler, which runs. The gap is then filled: the call should run
    (row 120 made a forged filler answer count as filled; a 'too large' filler answer is the same)."""
    from veil.sdk.calls import MemoryCalls
    from veil.sdk.counters import MemoryCounters

    lied: list[str] = []

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if not lied and request.request_id != "pay-1":
            lied.append(request.request_id)
            raise _too_large()
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
