"""A batch whose keeping of its fresh calls is refused midway (a later call's request id was
kept meanwhile by another account's call; a review found the earlier calls of the batch left
kept, never sent, with the high-water mark raised above them: the account's next call waited for
them): nothing of it stays kept, and the mark comes back down."""

from __future__ import annotations

from typing import Any

import pytest

from tests.client.test_sdk_batch_hostile import _pay
from tests.client.test_shared_request_id import CAROL, _balance, alice, bob, coins
from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import apps_pb2
from veil.sdk.errors import CounterGap, VeilClientError
from veil.sdk.identity import SigningIdentity

__all__ = ["alice", "bob", "coins"]  # the fixtures, shared with test_shared_request_id


class _BobFirst:
    """alice's calls store: before her first keep, bob's whole execute under "inv-42" runs (his
    claim and keep land between alice's claim and her batch's keeps)."""

    def __init__(self, inner: Any, run_bob: Any) -> None:
        self.inner, self.run_bob, self.done = inner, run_bob, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def keep(self, state: Any) -> bool:
        if not self.done:
            self.done = True
            self.run_bob()
        return bool(self.inner.keep(state))


def test_batch_refused_midway_leaves_no_orphan_and_no_wedge(
    mesh: InProcessMesh,
    coins: str,
    alice: SigningIdentity,
    bob: SigningIdentity,
) -> None:
    a_client, b_client = mesh.connect(timeout=5.0), mesh.connect(timeout=5.0)
    pay_carol = apps_pb2.AppCall(
        token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=CAROL, amount=50))
    )
    bob_result: dict[str, Any] = {}

    def run_bob() -> None:
        bob_result["r"] = b_client.execute(coins, pay_carol, bob, request_id="inv-42")

    a_client.calls = _BobFirst(a_client.calls, run_bob)
    try:
        with pytest.raises(VeilClientError) as refused:
            a_client.execute_many(coins, [_pay(1), _pay(2)], alice, request_ids=[None, "inv-42"])
        assert "names another call" in str(refused.value)
        assert bob_result["r"].accepted
        a_client.calls = a_client.calls.inner
        orphans = [c for c in a_client.calls.pending(coins, alice.account) if c.request_id != "inv-42"]
        # The app was told the batch failed (nothing of "inv-42" sent); its first call, under a
        # fresh id the app never learned, is kept unsent and holds alice's next counter.
        ids = [c.request_id for c in orphans]
        try:
            opened = a_client.execute(coins, _pay(3), alice)
        except CounterGap as gap:
            pytest.fail(
                f"alice's account is wedged: her next call waits for {gap.waiting_for}, the unsent "
                f"first call of the refused batch (kept orphans: {ids}); the app never got that id"
            )
        assert opened.accepted
        assert not orphans, f"kept unsent calls of a refused batch: {ids}"
    finally:
        a_client.close()
        b_client.close()
    assert _balance(mesh, alice) == 1000 - 3
