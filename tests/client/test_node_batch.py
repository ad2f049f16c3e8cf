"""Issue 13: the Node.js client's batch call (`TokenClient.transferMany` over ExecuteBatch).

The same in-process mesh and public port as tests/client/test_node_client.py: the transfers
leave in one ExecuteBatch, every answer is verified as `transfer` verifies its own, and an
answer the host loses is recovered under its request id without running twice.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.client.node_support import node_eval
from tests.client.test_node_client import funded
from tests.client.test_node_counter_gap import _node
from tests.gateway.support import InProcessMesh, fail_once
from veil.sdk.identity import SigningIdentity

__all__ = ["funded"]  # the fixture, shared with the single-transfer tests


def _node_transfer_many(
    mesh: InProcessMesh, to: str, amounts: list[int], request_ids: str = "undefined"
) -> Any:
    data_dir = json.dumps(str(mesh.data_dir))
    transfers = json.dumps([{"to": to, "amount": amount} for amount in amounts])
    return node_eval(
        f"""
        const fs = await import("node:fs");
        const dir = {data_dir};
        const ca = fs.readFileSync(dir + "/pki/ca.pem");
        const client = new veil.VeilNodeClient({json.dumps(mesh.public_address)}, ca, {{
          serverName: "localhost",
          policy: veil.loadPolicy(dir + "/expected-measurement.json"),
          rootPem: fs.readFileSync(dir + "/pki/sgx-root.pem"),
          counters: new veil.FileCounters(dir + "/counters.json"),
          pins: new veil.InstancePins(dir + "/instances.json"),
        }});
        const alice = veil.loadIdentity(dir + "/identities/alice.key");
        const tokens = client.token("coins", alice);
        const results = await tokens.transferMany({transfers}, {{ requestIds: {request_ids} }});
        client.close();
        console.log(JSON.stringify(results.map((r) => r.error
          ? {{ error: `${{r.error.constructor.name}}: ${{r.error.message}}` }}
          : {{ balance: r.balance.toString(), counter: r.opened.counter, sequence: r.opened.sequence }})));
        """
    )


def test_node_transfers_many_in_one_batch(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    alice, bob = funded
    state = mesh.states[0]
    batches, executed, head = state.calls["ExecuteBatch"], state.calls["Execute"], state.head("coins")
    results = _node_transfer_many(mesh, bob.account, [1, 2, 3, 4, 5])
    assert [r.get("balance") for r in results] == ["99", "97", "94", "90", "85"], results
    assert [r["counter"] for r in results] == [2, 3, 4, 5, 6]  # after the mint's counter 1
    assert state.calls["ExecuteBatch"] - batches == 1
    assert state.calls["Execute"] - executed == 5
    assert state.head("coins") == head + 5
    assert json.loads((mesh.data_dir / "counters.json").read_text())["coins"][alice.account] == 6
    with mesh.connect() as client:
        assert client.token("coins", bob).balance() == 15


def test_node_recovers_a_lost_answer_of_a_batch_without_paying_twice(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host runs all three transfers but loses the second one's answer: the client sends it
    again under its request id and gets the recorded answer; the enclave ran it once."""
    _, bob = funded
    state = mesh.states[0]
    lost = fail_once(state, "batch-row-2", monkeypatch, lose_answer=True)
    head = state.head("coins")
    results = _node_transfer_many(
        mesh, bob.account, [10, 10, 10], '["batch-row-1", "batch-row-2", "batch-row-3"]'
    )
    assert lost == ["batch-row-2"]
    assert [r.get("balance") for r in results] == ["90", "80", "70"], results
    assert state.head("coins") == head + 3
    with mesh.connect() as client:
        assert client.token("coins", bob).balance() == 30


def test_node_settles_a_command_that_came_too_early_under_its_own_counter(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica turns the second transfer away once (UNAVAILABLE, nothing ran; the gateway
    sends it again), so the third meets its counter too early: the client seals the third again
    under the same counter after the second ran; each runs once, in order."""
    _, bob = funded
    state = mesh.states[0]
    refused = fail_once(state, "busy-row-2", monkeypatch, lose_answer=False)
    head = state.head("coins")
    results = _node_transfer_many(mesh, bob.account, [1, 2, 3], '["busy-row-1", "busy-row-2", "busy-row-3"]')
    assert refused == ["busy-row-2"]
    assert [(r.get("balance"), r.get("counter")) for r in results] == [("99", 2), ("97", 3), ("94", 4)], (
        results
    )
    assert state.head("coins") == head + 3


def test_node_fills_the_counter_of_a_call_refused_for_good_so_the_later_ones_run_once(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    """A vault call on a token instance is refused for good before running: its counter stays
    unused below the batch's later sealings. The client uses it up with a balance read sent as a
    command (as the Python SDK does), and the later transfers run under their own counters."""
    _, bob = funded
    head = mesh.states[0].head("coins")
    transfer = {"token": {"transfer": {"to": bob.account, "amount": 5}}}
    calls = json.dumps([transfer, {"vault": {"put": {"recordId": "r", "data": "eA=="}}}, transfer, transfer])
    results = _node(
        mesh,
        f"""out = (await client.executeMany("coins", {calls}, alice)).map((r) => r.error
          ? {{ error: r.error.constructor.name }}
          : {{ accepted: r.answer.accepted, counter: r.answer.counter }});""",
    )
    assert results == [
        {"accepted": True, "counter": 2},
        {"accepted": False, "counter": 3},
        {"accepted": True, "counter": 4},
        {"accepted": True, "counter": 5},
    ], results
    assert mesh.states[0].head("coins") == head + 4  # three transfers and the filler under 3
    with mesh.connect() as client:
        assert client.token("coins", bob).balance() == 15


def test_a_rerun_of_a_batch_after_its_calls_were_lost_runs_nothing_and_blocks_nothing(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    """A batch under named ids runs; a new process that kept no calls (this helper's client keeps
    them in memory) sends it again: the mesh answers each id with its record, which this client
    cannot open (ForeignAnswer), and each new sealing has its counter used up by a read-only
    call, so none can run later and the account's next transfer is not stuck behind them."""
    _, bob = funded
    ids = '["pay-row-1", "pay-row-2"]'
    assert [r.get("balance") for r in _node_transfer_many(mesh, bob.account, [10, 10], ids)] == ["90", "80"]
    rerun = _node_transfer_many(mesh, bob.account, [10, 10], ids)
    assert [r.get("error", "").split(":")[0] for r in rerun] == ["ForeignAnswer", "ForeignAnswer"], rerun
    following = _node_transfer_many(mesh, bob.account, [1])
    assert [r.get("balance") for r in following] == ["79"], following
    with mesh.connect() as client:
        assert client.token("coins", bob).balance() == 21
