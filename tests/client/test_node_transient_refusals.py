"""The Node.js client never takes a temporary refusal as final (security.md row 104).

The outside review's attack on both clients: the host squeezes the enclave's memory budget for
one transfer, so the enclave seals "refused before running" (RESOURCE_EXHAUSTED) to the client,
keeps the sealing, and runs it once the budget is back. The client took the refusal as final
(lowered its high-water mark, forgot the call), so the transfer was reported refused though it
ran, and a retry paid twice. Now the sealed refusal says the sealing may run later, and the
client throws `NotRunYet`: the call is kept, and resuming it by request id gets the one run's
answer (tests/client/test_sdk_transient_refusals.py: the same for the Python SDK).
"""

from __future__ import annotations

import json

import pytest

from tests.client.test_node_counter_gap import _balance, _node, _transfer_30, funded
from tests.client.test_sdk_transient_refusals import SqueezedEnclave
from tests.gateway.support import InProcessMesh
from veil.sdk.identity import SigningIdentity

__all__ = ["funded"]

_CALLS = 'new veil.FileCalls(dir + "/node-calls")'


def test_a_budget_refusal_is_not_final_and_the_held_sealing_runs_once(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = funded
    host = SqueezedEnclave(mesh, monkeypatch)
    out = _node(mesh, _transfer_30(bob.account), calls=_CALLS)
    assert out["error"] == "NotRunYet", out
    assert "RESOURCE_EXHAUSTED" in out["message"]
    assert out["requestId"]
    assert json.loads((mesh.data_dir / "sealed.json").read_text())["coins"][alice.account] == 2  # not lowered
    assert len(list((mesh.data_dir / "node-calls").glob("*.json"))) == 1  # nor the call forgotten
    assert _balance(mesh, alice) == 100

    host.run("coins", host.seen[0])  # the budget back, the kept sealing runs
    assert _balance(mesh, alice) == 70
    resume = f", {{ requestId: {json.dumps(out['requestId'])} }}"
    resumed = _node(mesh, _transfer_30(bob.account, resume), calls=_CALLS)
    assert resumed == {"balance": "70"}  # the one run's answer
    assert _balance(mesh, alice) == 70  # not 40


def test_a_new_transfer_behind_one_not_run_yet_waits_for_it(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent again as a new call, the transfer is sealed above the kept one: CounterGap naming it."""
    alice, bob = funded
    SqueezedEnclave(mesh, monkeypatch)
    out = _node(mesh, _transfer_30(bob.account), calls=_CALLS)
    assert out["error"] == "NotRunYet", out
    monkeypatch.undo()  # an honest host from here on
    again = _node(mesh, _transfer_30(bob.account), calls=_CALLS)
    assert again["error"] == "CounterGap", again
    assert again["waitingFor"] == [out["requestId"]]
    assert _balance(mesh, alice) == 100
