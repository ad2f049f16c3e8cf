"""A process stopped (SIGSTOP, a debugger, a hung fsync) while holding <calls>/ids.lock must not
block every call on the data dir for good: keeping a call gives up after its wait with a
VeilClientError (nothing sent), as the per-account lock does (a review found it waited forever)."""

from __future__ import annotations

import fcntl
import threading
from typing import Any

from tests.client.test_sdk_batch_hostile import _pay
from tests.client.test_shared_request_id import alice, bob, coins
from tests.gateway.support import InProcessMesh
from veil.sdk.errors import VeilClientError
from veil.sdk.identity import SigningIdentity

__all__ = ["alice", "bob", "coins"]  # the fixtures, shared with test_shared_request_id


def test_a_held_ids_lock_does_not_hang_a_call_for_good(
    mesh: InProcessMesh,
    coins: str,
    alice: SigningIdentity,
) -> None:
    client = mesh.connect(timeout=1.0)
    lock_path = mesh.data_dir / "calls" / "ids.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["r"] = client.execute(coins, _pay(1), alice)
        except BaseException as error:
            result["r"] = error

    with open(lock_path, "a") as holder:  # another (stopped) process holding it
        fcntl.flock(holder, fcntl.LOCK_EX)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(15)  # the wait is IDS_LOCK_WAIT_S (5 s)
        hung = thread.is_alive()
        fcntl.flock(holder, fcntl.LOCK_UN)
    thread.join(15)
    client.close()
    assert not hung, f"execute blocked > 15 s on {lock_path} (then: {result.get('r')!r})"
    assert isinstance(result["r"], VeilClientError), result
    assert "nothing was sent" in str(result["r"])
