"""Issue 13: the gateway coalesces concurrent Execute calls to a replica into ExecuteBatch
messages (a lone call goes as a plain Execute); each caller keeps its own answer, status and
deadline, and a failed message fails only the commands it had not answered yet."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from tests.gateway.support import FailedCall
from veil.services.common.errors import NotFound
from veil.services.gateway.upstream import BatchedCallError, ExecuteCoalescer, translate
from veil.state.v1 import state_pb2


class FakeReplica:
    """ExecuteBatch as a stream: answers each command with its own request id after `delay`."""

    def __init__(self, delay: float = 0.05, *, fail_after: int | None = None) -> None:
        self.delay = delay
        self.fail_after = fail_after
        self.messages: list[list[str]] = []
        self._lock = threading.Lock()

    def __call__(self, request: state_pb2.ExecuteBatchRequest, *, timeout: float) -> Iterator[Any]:
        with self._lock:
            self.messages.append([c.request_id for c in request.commands])
        time.sleep(self.delay)
        for index, command in reversed(list(enumerate(request.commands))):  # any order
            if self.fail_after is not None and len(request.commands) - index > self.fail_after:
                raise FailedCall(grpc.StatusCode.UNAVAILABLE, "connection reset")
            if command.request_id.startswith("missing"):
                status = NotFound(f"instance {command.instance_id!r} not found").to_status()
                yield state_pb2.ExecuteBatchResponse(index=index, status=status.SerializeToString())
            else:
                response = state_pb2.ExecuteResponse()
                response.outcome.sealed_response = command.request_id.encode()
                yield state_pb2.ExecuteBatchResponse(index=index, response=response)

    def single(
        self, request: state_pb2.ExecuteRequest, *, timeout: float, metadata: object = None
    ) -> state_pb2.ExecuteResponse:
        """The unary Execute a lone call takes: a message of one, answered the same way."""
        (reply,) = self(state_pb2.ExecuteBatchRequest(commands=[request]), timeout=timeout)
        if reply.HasField("status"):
            raise BatchedCallError(status_pb2.Status.FromString(reply.status))
        response: state_pb2.ExecuteResponse = reply.response
        return response


def _coalescer(replica: FakeReplica, **options: int) -> ExecuteCoalescer:
    return ExecuteCoalescer(replica, replica.single, **options)  # type: ignore[arg-type]


def _call(coalescer: ExecuteCoalescer, request_id: str, timeout: float = 5.0) -> bytes | str:
    try:
        reply = coalescer(state_pb2.ExecuteRequest(instance_id="i", request_id=request_id), timeout=timeout)
    except grpc.RpcError as error:
        return translate(error, "shard").reason
    return reply.outcome.sealed_response


def test_concurrent_calls_share_messages_and_keep_their_answers() -> None:
    replica = FakeReplica()
    coalescer = _coalescer(replica, max_in_flight=2)
    names = [f"r{i}" for i in range(40)] + ["missing-1"]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = dict(zip(names, pool.map(lambda n: _call(coalescer, n), names), strict=True))
    assert answers == {**{f"r{i}": f"r{i}".encode() for i in range(40)}, "missing-1": "NOT_FOUND"}
    assert sorted(n for message in replica.messages for n in message) == sorted(names)  # each sent once
    assert len(replica.messages) < len(names) / 2  # coalesced


def test_a_lone_call_is_sent_at_once() -> None:
    replica = FakeReplica(delay=0)
    coalescer = _coalescer(replica)
    began = time.monotonic()
    assert _call(coalescer, "alone") == b"alone"
    assert time.monotonic() - began < 1.0
    assert replica.messages == [["alone"]]


def test_a_caller_stops_waiting_at_its_own_deadline() -> None:
    coalescer = _coalescer(FakeReplica(delay=1.0), max_in_flight=1)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_call, coalescer, "slow")  # holds the only slot for a second
        time.sleep(0.05)
        began = time.monotonic()
        assert _call(coalescer, "impatient", timeout=0.2) == "DEADLINE_EXCEEDED"  # queued behind it
        assert time.monotonic() - began < 0.9
        assert slow.result() == b"slow"


@pytest.mark.parametrize("answered_first", [0, 2])
def test_a_failed_message_fails_its_unanswered_commands(answered_first: int) -> None:
    replica = FakeReplica(delay=0.2, fail_after=answered_first)
    coalescer = _coalescer(replica, max_in_flight=1)
    names = ["first", *(f"r{i}" for i in range(5))]
    with ThreadPoolExecutor(len(names)) as pool:
        first = pool.submit(_call, coalescer, "first")
        time.sleep(0.05)  # the rest queue behind the first message, then leave together
        rest = list(pool.map(lambda n: _call(coalescer, n), names[1:]))
    assert first.result() == (b"first" if answered_first else "SHARD_UNAVAILABLE")
    assert replica.messages == [["first"], names[1:]]
    # The replica answers from the end: the last `answered_first` got through, the others failed.
    expected = ["SHARD_UNAVAILABLE"] * (5 - answered_first) + [
        n.encode() for n in names[6 - answered_first :]
    ]
    assert rest == expected


class HostileReplica(FakeReplica):
    """A replica (the host) that answers a command twice, names an index that was never sent,
    and leaves the rest unanswered."""

    def __call__(self, request: state_pb2.ExecuteBatchRequest, *, timeout: float) -> Iterator[Any]:
        self.messages.append([c.request_id for c in request.commands])
        time.sleep(self.delay)
        first = state_pb2.ExecuteResponse()
        first.outcome.sealed_response = b"first"
        yield state_pb2.ExecuteBatchResponse(index=0, response=first)
        forged = state_pb2.ExecuteResponse()
        forged.outcome.sealed_response = b"forged"
        yield state_pb2.ExecuteBatchResponse(index=0, response=forged)
        yield state_pb2.ExecuteBatchResponse(index=len(request.commands) + 7, response=forged)

    def single(
        self, request: state_pb2.ExecuteRequest, *, timeout: float, metadata: object = None
    ) -> state_pb2.ExecuteResponse:
        self.messages.append([request.request_id])
        time.sleep(self.delay)
        response = state_pb2.ExecuteResponse()
        response.outcome.sealed_response = request.request_id.encode()
        return response


def _one_message_behind_a_lone_call(replica: FakeReplica) -> list[bytes | str]:
    """A lone call leaves first (a plain Execute); a, b and c queue behind it and leave as one
    ExecuteBatch message to `replica`: their answers."""
    coalescer = _coalescer(replica, max_in_flight=1)
    with ThreadPoolExecutor(4) as pool:
        lone = pool.submit(_call, coalescer, "lone")
        time.sleep(0.05)
        rest = list(pool.map(lambda n: _call(coalescer, n, timeout=10.0), ["a", "b", "c"]))
    assert lone.result() == b"lone"
    assert replica.messages == [["lone"], ["a", "b", "c"]]
    return rest


def test_a_hostile_replica_answers_each_command_once_and_never_hangs_the_rest() -> None:
    replica = HostileReplica(delay=0.2)
    began = time.monotonic()
    rest = _one_message_behind_a_lone_call(replica)
    assert rest == [b"first", "UPSTREAM_ERROR", "UPSTREAM_ERROR"]  # the first answer stands
    assert time.monotonic() - began < 5.0  # failed when the stream ended, not at the deadline


def test_a_group_leaves_whole_and_in_order_never_interleaved() -> None:
    """A public ExecuteBatch's commands (one account's consecutive counters) go as one ordered
    group: never split across messages, never mixed with calls that queued around them."""
    replica = FakeReplica(delay=0.2)
    coalescer = _coalescer(replica, max_batch=8, max_in_flight=1)
    group = [state_pb2.ExecuteRequest(instance_id="i", request_id=f"g{i}") for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(_call, coalescer, "busy")  # holds the slot: what follows queues
        time.sleep(0.05)
        before = pool.submit(_call, coalescer, "before")
        time.sleep(0.05)
        answers = coalescer.submit_group(group, timeout=5.0)
        after = [pool.submit(_call, coalescer, f"after{i}") for i in range(3)]
        assert [a.result(5).outcome.sealed_response for a in answers] == [f"g{i}".encode() for i in range(6)]
        assert (busy.result(), before.result()) == (b"busy", b"before")
        assert [a.result() for a in after] == [f"after{i}".encode() for i in range(3)]
    grouped = [m for m in replica.messages if "g0" in m]
    assert len(grouped) == 1  # whole
    message = grouped[0]
    start = message.index("g0")
    assert message[start : start + 6] == [f"g{i}" for i in range(6)]  # contiguous, in order
    assert message[:start] in ([], ["before"])  # what queued before it may share the message
    with pytest.raises(ValueError, match="1 to 8"):
        coalescer.submit_group(group + group, timeout=1.0)


class GarblingReplica(HostileReplica):
    """A replica (the host) whose answer for the first command of a message is a status that does
    not parse (its plain Execute answers honestly)."""

    read_after_garbage = False

    def __call__(self, request: state_pb2.ExecuteBatchRequest, *, timeout: float) -> Iterator[Any]:
        self.messages.append([c.request_id for c in request.commands])
        time.sleep(self.delay)
        yield state_pb2.ExecuteBatchResponse(index=0, status=b"\xff\xff")
        self.read_after_garbage = True
        for index, command in enumerate(request.commands[1:], start=1):
            response = state_pb2.ExecuteResponse()
            response.outcome.sealed_response = command.request_id.encode()
            yield state_pb2.ExecuteBatchResponse(index=index, response=response)


def test_an_unreadable_status_fails_its_command_alone_and_the_stream_is_read_on() -> None:
    replica = GarblingReplica(delay=0.2)
    assert _one_message_behind_a_lone_call(replica) == ["UPSTREAM_ERROR", b"b", b"c"]
    assert replica.read_after_garbage
