"""A host that answers RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE (a lie) to a sealing it holds,
then runs that sealing before or after the client's filler, in a single call and in a batch. A
command must never run twice, a command that ran must never be reported "nothing ran", and the
account must go on (a fresh-context review's tests, adopted)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from tests.client.test_foreign_answer import _Stub, too_large
from tests.client.test_sdk_batch_hostile import Down, _pay, alice, coins
from tests.client.test_shared_request_id import _balance
from tests.gateway.support import InProcessMesh
from veil.sdk.errors import CounterGap, NotSettledYet, OutcomeUnknown, RequestTooLarge, VeilClientError
from veil.sdk.identity import SigningIdentity

__all__ = ["alice", "coins"]


def _lying_about_p1(held: list[Any], *, run_held_first: bool = False) -> Any:
    """The host's Execute: it keeps every sealing of "p1" and says it is too large; with
    `run_held_first`, it runs the first held sealing before the next command it passes on."""
    ran: list[bool] = []

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.request_id == "p1":
            held.append(request)
            raise too_large()
        if run_held_first and held and not ran:
            ran.append(True)
            real.Execute(held[0], **kw)  # the host runs the held sealing first
        return real.Execute(request, **kw)

    return execute


def test_held_sealing_run_before_the_filler_is_reported_as_run_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    held: list[Any] = []
    execute = _lying_about_p1(held, run_held_first=True)
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
    execute = _lying_about_p1(held)
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
        raise too_large()

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.request_id == "b1":
            raise too_large()
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


def test_a_too_large_call_whose_counter_cannot_be_used_up_is_kept_and_never_said_to_be_over(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """The host says "too large" and answers the filler with nothing: the call stays kept
    (NotSettledYet), and its cause is the gateway's refusal, not "nothing ran"."""
    held: list[Any] = []
    lying = _lying_about_p1(held)

    def execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.request_id != "p1":  # the filler: no answer
            raise Down()
        return lying(real, request, **kw)

    with mesh.connect(timeout=2.0) as client:
        client._stub = _Stub(client._stub, execute)  # type: ignore[assignment]
        with pytest.raises(NotSettledYet) as kept:
            client.execute(coins, _pay(10), alice, request_id="p1")
        assert "refused the sealed command" in str(kept.value)
        assert "nothing ran" not in str(kept.value)
        assert kept.value.request_id == "p1"
        assert client.calls.get("p1") is not None
