"""The Node client's executeMany after an answer no sealing of a call opens (ForeignAnswer): the
call whose counter the filler used up leaves node-calls/, as in `execute` and the Python SDK."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import grpc

from tests.client.node_support import node_clients, node_eval
from tests.client.test_node_client import HostileGateway, evil, funded
from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.identity import SigningIdentity

__all__ = ["evil", "funded"]


def _forged() -> gateway_pb2.ExecuteResponse:
    return gateway_pb2.ExecuteResponse(outcome=envelope_pb2.CommandOutcome(sealed_response=b"\x00" * 64))


def _many(mesh: InProcessMesh, address: str, to: str, ids: list[str]) -> Any:
    transfers = json.dumps([{"to": to, "amount": 10} for _ in ids])
    return node_eval(
        node_clients(mesh.data_dir, address, timeout_ms=3000)
        + f"""
        const client = make();
        const alice = veil.loadIdentity(dir + "/identities/alice.key");
        const tokens = client.token("coins", alice);
        const results = await tokens.transferMany({transfers}, {{ requestIds: {json.dumps(ids)} }});
        client.close();
        console.log(JSON.stringify(results.map((r) => r.error
          ? {{ error: r.error.constructor.name }} : {{ counter: r.opened.counter }})));
        """
    )


def test_node_execute_many_drops_a_foreign_answer_call_from_its_calls_store(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    """executeMany (ExecuteBatch is not proxied: each call goes alone): "b-1" gets a forged
    answer, its counter is used up by the filler and its sealings dropped, and it leaves the
    store; kept, node-calls/ held the dead sealing as an unsettled call (listed by `pending`,
    refused by the Python SDK on the same data dir, resumed as a call that may have run)."""
    servicer, address = evil

    def hook(request: Any, context: grpc.ServicerContext, forward: Any) -> Any:
        if request.request_id == "b-1":
            return _forged()
        return forward()

    servicer.execute_hook = hook
    results = _many(mesh, address, funded[1].account, ["b-1", "b-2"])
    assert results[0] == {"error": "ForeignAnswer"}, results
    assert results[1] == {"counter": 3}, results  # the filler used 2, b-2 ran under 3
    kept = mesh.data_dir / "node-calls" / f"{hashlib.sha256(b'b-1').hexdigest()}.json"
    document = json.loads(kept.read_text()) if kept.exists() else None
    assert document is None, f"node-calls/ still keeps the dropped call b-1: {document}"
