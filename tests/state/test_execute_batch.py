"""Issue 13: ExecuteBatch runs each command as its own Execute would, in one message: answers
streamed back tagged with their index, one command's failure confined to it, a request id
repeated in the batch answered once, and a second batch of the same request ids replayed from
the stored answers, never run twice."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import status_pb2

from tests.state.support import Node, token_issuer_served
from tests.state.test_server import Running
from veil.dev.loadclient import mint
from veil.services.state.server import MAX_BATCH_COMMANDS
from veil.state.v1 import state_pb2


@pytest.fixture
def running(node: Node) -> Iterator[Running]:
    server = Running(node)
    yield server
    server.stop()


def _by_index(replies: Iterator[state_pb2.ExecuteBatchResponse]) -> dict[int, state_pb2.ExecuteBatchResponse]:
    answered: dict[int, state_pb2.ExecuteBatchResponse] = {}
    for reply in replies:
        assert reply.index not in answered
        answered[reply.index] = reply
    return answered


def test_a_batch_answers_each_command_alone(running: Running) -> None:
    running.wait_serving()
    stub = running.stub()
    issuer = token_issuer_served(stub, "tokens")
    sealed = [issuer.seal(mint(f"account-{i}", i + 1)) for i in range(5)]
    commands = [
        state_pb2.ExecuteRequest(instance_id="tokens", command=s.command, request_id=s.request_id)
        for s in sealed
    ]
    # An unknown instance between them, and the first command's request id once more.
    commands.insert(
        2, state_pb2.ExecuteRequest(instance_id="nowhere", command=sealed[0].command, request_id="x")
    )
    commands.append(commands[0])
    answered = _by_index(stub.ExecuteBatch(state_pb2.ExecuteBatchRequest(commands=commands), timeout=10))
    assert sorted(answered) == list(range(len(commands)))
    refused = status_pb2.Status.FromString(answered[2].status)
    assert refused.code == grpc.StatusCode.NOT_FOUND.value[0]
    # Each mint answers the supply after it: all five ran, once each, in the batch's order.
    supplies = [
        issuer.open(one, answered[index].response.outcome).result.token.mint.amount
        for index, one in zip([0, 1, 3, 4, 5], sealed, strict=True)
    ]
    assert supplies == [1, 3, 6, 10, 15]
    assert answered[6].response == answered[0].response  # the repeated id: the same answer

    again = _by_index(stub.ExecuteBatch(state_pb2.ExecuteBatchRequest(commands=commands[:2]), timeout=10))
    assert [again[0].response, again[1].response] == [answered[0].response, answered[1].response]
    status = stub.GetStatus(state_pb2.GetStatusRequest(), timeout=5)
    assert status.commands == 5  # five mints ran, each once


def test_a_batch_too_large_is_refused_whole(running: Running) -> None:
    running.wait_serving()
    command = state_pb2.ExecuteRequest(instance_id="x", request_id="r")
    request = state_pb2.ExecuteBatchRequest(commands=[command] * (MAX_BATCH_COMMANDS + 1))
    with pytest.raises(grpc.RpcError) as raised:
        list(running.stub().ExecuteBatch(request, timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
