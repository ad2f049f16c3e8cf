"""An outside review: the host sent a client's sealed *command* to the enclave's Query ecall.

A transfer is not a read-only method, so the Query path refused it, sealed under the command's
own response key, with no receipt and not flagged `may_run_later`: a genuine final-looking
refusal. Both clients took it as the call's answer (mark lowered, call forgotten); the host then
ran the same sealing through Execute, and an app that retried paid twice (990 for one 5-coin
call; 40 for one 30-coin Node transfer).

Now the Query ecall refuses, *unsealed*, any sealing whose counter is not 0 (a query's): that is
the host's word to a client, ambiguous, so the command is sent again only under its own counter.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from tests.client.test_node_client import funded
from tests.client.test_node_counter_gap import _balance as _node_balance
from tests.client.test_node_counter_gap import _node, _transfer_30
from tests.client.test_sdk_batch_hostile import _balance, _pay, alice, coins
from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.client import VeilClient
from veil.sdk.identity import SigningIdentity

__all__ = ["alice", "coins", "funded"]


class QueryRouter:
    """The hostile gateway: the first Execute (or ExecuteBatch) goes to the Query RPC instead,
    its answer passed off as the Execute's; every request is kept (`held`) to run later."""

    def __init__(self, client: VeilClient) -> None:
        self.real = client._stub
        self.held: list[gateway_pb2.ExecuteRequest] = []
        self.misroute = True
        client._stub = self  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def _as_query(self, request: gateway_pb2.ExecuteRequest) -> envelope_pb2.CommandOutcome:
        query = gateway_pb2.QueryRequest(instance_id=request.instance_id, command=request.command)
        return self.real.Query(query).outcome

    def Execute(self, request: gateway_pb2.ExecuteRequest, **kw: Any) -> Any:
        self.held.append(_copy(request))
        if self.misroute:
            self.misroute = False
            return gateway_pb2.ExecuteResponse(outcome=self._as_query(request))
        return self.real.Execute(request, **kw)

    def ExecuteBatch(self, request: gateway_pb2.ExecuteBatchRequest, **kw: Any) -> Any:
        self.held.extend(_copy(c) for c in request.commands)
        if not self.misroute:
            return self.real.ExecuteBatch(request, **kw)
        self.misroute = False
        answers = []
        for index, command in enumerate(request.commands):
            item = gateway_pb2.ExecuteBatchResponse(index=index)
            try:
                item.response.outcome.CopyFrom(self._as_query(command))
            except grpc.RpcError as error:  # passed on as that command's failure
                item.status = _status(error)
            answers.append(item)
        return iter(answers)


def _copy(request: gateway_pb2.ExecuteRequest) -> gateway_pb2.ExecuteRequest:
    kept = gateway_pb2.ExecuteRequest()
    kept.CopyFrom(request)
    return kept


def _status(error: grpc.RpcError) -> bytes:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    return bytes(status.SerializeToString())


def _runs(host: QueryRouter, request: gateway_pb2.ExecuteRequest) -> bool:
    """Whether the host can still run a sealing it kept (through Execute, under its own id)."""
    replay = _copy(request)
    replay.request_id = "host-" + request.request_id[:40]
    try:
        return bool(host.real.Execute(replay).outcome.accepted)
    except grpc.RpcError:
        return False


def test_a_command_misrouted_to_query_is_not_a_final_refusal(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    with mesh.connect() as client:
        host = QueryRouter(client)
        answer = client.execute(coins, _pay(5), alice)  # ambiguous, then sealed again: same counter
        assert answer.accepted
        assert not _runs(host, host.held[0])  # the kept sealing's counter is used: it never runs
    assert _balance(mesh, alice) == 995


def test_a_batch_misrouted_to_query_runs_each_command_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    with mesh.connect() as client:
        host = QueryRouter(client)
        results = client.execute_many(coins, [_pay(5), _pay(7)], alice)
        assert all(not isinstance(r, Exception) and r.accepted for r in results), results
        assert not any(_runs(host, held) for held in host.held)
    assert _balance(mesh, alice) == 988


class _QueryingHost:
    """The state host: the first command it is given goes to the enclave's Query ecall (the
    honest host's read fence after it), and that answer is returned as the Execute outcome."""

    def __init__(self, mesh: InProcessMesh, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = mesh.states[0]
        self.honest = self.state.harness.execute
        self.seen: list[Any] = []
        self.misroute = True
        monkeypatch.setattr(self.state.harness, "execute", self._execute)

    def _execute(self, instance_id: str, commands: list[Any]) -> Any:
        self.seen.extend(commands)
        if not self.misroute:
            return self.honest(instance_id, commands)
        self.misroute = False
        response = self.state.host.query(instance_id, commands[0], int(time.time() * 1000))
        if response.read_round:
            self.state.harness.read_fence(instance_id)
            self.state.harness.unwrap_read(instance_id, response.read_round, response.outcome)
        return SimpleNamespace(outcomes=[response.outcome])


def test_node_a_command_misrouted_to_query_is_not_a_final_refusal(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = funded
    host = _QueryingHost(mesh, monkeypatch)
    out = _node(mesh, _transfer_30(bob.account), calls='new veil.FileCalls(dir + "/node-calls")')
    assert out == {"balance": "70"}, out  # ambiguous, then sealed again under the same counter
    (refused,) = host.honest("coins", [host.seen[0]]).outcomes  # the kept sealing, run later
    assert not refused.accepted
    monkeypatch.undo()
    assert _node_balance(mesh, alice) == 70
