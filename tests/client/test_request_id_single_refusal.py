"""After a single call is refused when it is kept (another account's call owns the request id),
its account is not stuck: the next call runs."""

from __future__ import annotations

from tests.client.test_sdk_batch_hostile import _pay
from tests.client.test_shared_request_id import _balance, _race, alice, bob, coins
from tests.gateway.support import InProcessMesh
from veil.sdk.errors import VeilClientError
from veil.sdk.identity import SigningIdentity

__all__ = ["alice", "bob", "coins"]  # the fixtures, shared with test_shared_request_id


def test_after_a_refused_keep_the_next_call_runs(
    mesh: InProcessMesh,
    coins: str,
    alice: SigningIdentity,
    bob: SigningIdentity,
) -> None:
    a, _ = _race(mesh, coins, alice, bob, memory=False)
    assert isinstance(a, VeilClientError), a
    assert a.request_id is None, a
    with mesh.connect(timeout=5.0) as client:
        kept = client.calls.get("inv-42")
        assert kept is not None
        assert kept.account == bob.account  # the owner's entry, untouched
        # The refused call's counter came back down: alice's next call takes it, no filler needed.
        assert client.counters.sealed(coins, alice.account) == client.counters.last(coins, alice.account)
        assert client.execute(coins, _pay(7), alice).accepted
        assert not client.calls.pending(coins, alice.account)
    assert _balance(mesh, alice) == 993
