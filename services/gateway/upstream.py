"""Calls to the state replicas, and what their failures become for the gateway's caller.

Execute calls ride on ExecuteBatch messages (`coalescing_stub`). A call to an idle replica
(nothing in flight) goes at once as a plain Execute, so a lone client pays nothing extra; else
it is sent at once as a message while fewer than `MAX_IN_FLIGHT` are unanswered, and the calls
that arrive meanwhile wait and leave together in the next message, so under load one upstream
RPC carries many commands (the state host feeds them to its batcher together). The replica
streams each command's answer back as soon as it is ready. Each command keeps its own deadline
(its caller stops waiting at it, as for a unary call; a message's deadline is the latest of its
commands'), its own request id and its own status; a failed message fails its unanswered
commands with the message's status, which `call` retries as it retries a unary UNAVAILABLE.
Back-pressure: at most MAX_IN_FLIGHT messages of MAX_BATCH commands per replica; further calls
wait in the gateway (bounded by its concurrent-RPC limit).

A public ExecuteBatch hands its commands for one replica over as a *group* (`submit_group`):
queued together, in their order, and never split across messages or interleaved with other
calls, so one account's consecutive counters reach the replica, its batcher and the enclave in
the order the client sealed them (the enclave runs a command only under the account's next
counter). A group is at most MAX_BATCH commands, the public batch cap.

A state replica's status is passed on when it describes the caller's request (not found,
invalid, exhausted, deadline, retry later), with its message and ErrorInfo reason: those
were already sanitized by the state service's own error interceptor. Anything that says
something about the mesh itself (the gateway's identity refused, an upstream bug, an
unimplemented method) becomes UNAVAILABLE with a fixed message, so nothing internal leaks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from veil.services.common.channels import call
from veil.services.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VeilError,
)
from veil.state.v1 import state_pb2, state_pb2_grpc
from veil.status import ERROR_DOMAIN, StatusError, error_info

_log = logging.getLogger(__name__)

Resp = TypeVar("Resp")
Req = TypeVar("Req")

_PASSED_ON: Mapping[grpc.StatusCode, type[VeilError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def translate(error: grpc.RpcError, shard: str) -> VeilError:
    """The gateway's answer for a failed state call."""
    code = error.code()
    cls = _PASSED_ON.get(code)
    if cls is None:
        _log.error("state replica %s failed with %s: %s", shard, code.name, error.details())
        return Unavailable(
            "the state service could not serve the request", reason="UPSTREAM_ERROR", internal=True
        )
    info = error_info(error)
    reason = info.reason if info is not None and info.reason else None
    if code == grpc.StatusCode.UNAVAILABLE and reason is None:
        # A transport failure (no ErrorInfo): say so without naming addresses.
        return Unavailable(
            "the state replica for this instance is unreachable", reason="SHARD_UNAVAILABLE", internal=True
        )
    # Its text and reason are another service's: shown only to mesh callers (public_errors).
    return cls(error.details() or code.name.lower(), reason=reason, internal=True)


def forward(shard: str, method: Callable[..., Resp], request: Req, *, timeout: float) -> Resp:
    """Call a state method with the caller's remaining deadline; UNAVAILABLE is retried by `call`."""
    try:
        return call(method, request, timeout=timeout)
    except grpc.RpcError as error:
        raise translate(error, shard) from None


# --- Execute over ExecuteBatch ----------------------------------------------------------------

#: Commands per ExecuteBatch message (the state service accepts up to 1024).
MAX_BATCH = 256
#: Unanswered ExecuteBatch messages per replica before calls wait to be coalesced.
MAX_IN_FLIGHT = 4


#: One command's failure inside an ExecuteBatch answer, shaped as a failed unary call's error,
#: so `call` and `translate` treat it exactly as they treat a failed Execute.
BatchedCallError = StatusError


def _deadline_exceeded() -> BatchedCallError:
    info = error_details_pb2.ErrorInfo(reason="DEADLINE_EXCEEDED", domain=ERROR_DOMAIN)
    status = status_pb2.Status(
        code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        message="the command was not committed within the deadline; retry with the same request_id",
    )
    status.details.add().Pack(info)
    return BatchedCallError(status)


class Answer:
    """One queued command's answer: the part of a Future the coalescer and its callers use
    (done, set_result, set_exception, result and exception with a timeout, add_done_callback),
    on two plain locks. A Future builds a Condition (an RLock and Python-level bookkeeping) per
    command and wakes its waiter through it; this is made and handed over once per command."""

    __slots__ = ("_callbacks", "_error", "_guard", "_ready", "_set", "_value")

    def __init__(self) -> None:
        self._ready = threading.Lock()  # held until the answer is set
        self._ready.acquire()
        self._guard = threading.Lock()  # the answer against callbacks being added
        self._set = False
        self._value: state_pb2.ExecuteResponse | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Answer], object]] = []

    def done(self) -> bool:
        return self._set

    def set_result(self, value: state_pb2.ExecuteResponse) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: state_pb2.ExecuteResponse | None, error: BaseException | None) -> None:
        with self._guard:
            if self._set:  # as a Future refuses a second answer
                raise InvalidStateError("the answer is set already")
            self._value, self._error = value, error
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        self._ready.release()
        for callback in callbacks:
            self._run(callback)

    def add_done_callback(self, callback: Callable[[Answer], object]) -> None:
        """Call `callback(self)` once answered: on the thread that answers, or now if answered."""
        with self._guard:
            if not self._set:
                self._callbacks.append(callback)
                return
        self._run(callback)

    def _run(self, callback: Callable[[Answer], object]) -> None:
        try:
            callback(self)
        except Exception:  # as a Future: logged, never raised into whoever set the answer
            _log.exception("exception calling callback for %r", self)

    def _wait(self, timeout: float | None) -> None:
        if self._set:  # answered (set after the value, under the guard): no wait, as a Future
            return
        if not self._ready.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise FutureTimeout
        self._ready.release()  # it stays answered

    def result(self, timeout: float | None = None) -> state_pb2.ExecuteResponse:
        """The answer, or raise its error; FutureTimeout after `timeout` seconds."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The answer's error, None for a response; FutureTimeout after `timeout` seconds."""
        self._wait(timeout)
        return self._error


@dataclass
class _Waiting:
    request: state_pb2.ExecuteRequest
    deadline: float
    answer: Answer = field(default_factory=Answer)


class ExecuteCoalescer:
    """Execute for one replica, sent as ExecuteBatch messages (see the module docstring)."""

    def __init__(
        self,
        send: grpc.UnaryStreamMultiCallable[state_pb2.ExecuteBatchRequest, state_pb2.ExecuteBatchResponse],
        single: grpc.UnaryUnaryMultiCallable[state_pb2.ExecuteRequest, state_pb2.ExecuteResponse],
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._send = send
        self._single = single
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: deque[list[_Waiting]] = deque()  # groups: a lone Execute is a group of one
        self._lock = threading.Lock()
        self._in_flight = 0
        # Reading a stream blocks: one thread per message in flight.
        self._readers = ThreadPoolExecutor(max_in_flight, thread_name_prefix="execute-batch")

    def __call__(
        self,
        request: state_pb2.ExecuteRequest,
        *,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> state_pb2.ExecuteResponse:
        """Execute `request` within `timeout` seconds; raises grpc.RpcError as a unary call would."""
        waiting = _Waiting(request, time.monotonic() + timeout)
        with self._lock:
            free = self._in_flight < self._max_in_flight
            alone = self._in_flight == 0  # idle: nothing to wait for or coalesce with
            if free:
                self._in_flight += 1
            if not alone:
                self._queue.append([waiting])
        if alone:  # nothing to coalesce with: a plain Execute from this thread, no hand-over
            try:
                return self._single(request, timeout=timeout, metadata=metadata)
            finally:
                self._release()
        if free:
            self._readers.submit(self._carry)
        try:
            return waiting.answer.result(timeout)
        except FutureTimeout:
            raise _deadline_exceeded() from None

    def submit_group(self, requests: list[state_pb2.ExecuteRequest], *, timeout: float) -> list[Answer]:
        """Queue `requests` to leave together, in order, in one ExecuteBatch message; one future
        each (its failure is a grpc.RpcError, as `__call__` raises)."""
        if not 0 < len(requests) <= self._max_batch:
            raise ValueError(f"a group holds 1 to {self._max_batch} commands")
        deadline = time.monotonic() + timeout
        group = [_Waiting(request, deadline) for request in requests]
        with self._lock:
            free = self._in_flight < self._max_in_flight
            if free:
                self._in_flight += 1
            self._queue.append(group)
        if free:
            self._readers.submit(self._carry)
        return [waiting.answer for waiting in group]

    def _release(self) -> None:
        """A plain Execute ended: its slot carries what queued meanwhile, or is freed."""
        with self._lock:
            if not self._queue:
                self._in_flight -= 1
                return
        self._readers.submit(self._carry)

    def _carry(self) -> None:
        """One in-flight slot: send what waits, read its answers, repeat while calls wait."""
        while True:
            with self._lock:
                now = time.monotonic()
                batch: list[_Waiting] = []
                expired: list[_Waiting] = []
                # Whole groups only, in their order: a group never shares its place with others.
                while self._queue and len(batch) + len(self._queue[0]) <= self._max_batch:
                    for waiting in self._queue.popleft():
                        # Sent only while its caller has not given up yet.
                        (batch if waiting.deadline > now else expired).append(waiting)
                if not batch:
                    self._in_flight -= 1
            for waiting in expired:  # outside the lock: a future's callbacks run here
                if not waiting.answer.done():
                    waiting.answer.set_exception(_deadline_exceeded())
            if not batch:
                return
            try:
                self._exchange(batch, max(w.deadline for w in batch) - now)
            except Exception:  # never lose the slot: fail what is left of this batch
                _log.exception("ExecuteBatch to a state replica failed")
            for waiting in batch:  # a command the replica did not answer fails, never hangs
                if not waiting.answer.done():
                    waiting.answer.set_exception(BatchedCallError(_missing().to_status()))

    def _exchange(self, batch: list[_Waiting], timeout: float) -> None:
        request = state_pb2.ExecuteBatchRequest(commands=[w.request for w in batch])
        try:
            for result in self._send(request, timeout=timeout):
                if result.index >= len(batch) or batch[result.index].answer.done():
                    _log.error("ExecuteBatch answered index %d twice or out of range", result.index)
                    continue
                answer = batch[result.index].answer
                if result.HasField("response"):
                    answer.set_result(result.response)
                    continue
                try:
                    status = status_pb2.Status.FromString(result.status)
                except DecodeError:  # fails that command alone; the stream is read to its end
                    _log.error("ExecuteBatch answered index %d with an unreadable status", result.index)
                    status = _missing().to_status()
                answer.set_exception(BatchedCallError(status))
        except grpc.RpcError as error:  # the message failed: its unanswered commands fail with it
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)


def _missing() -> Unavailable:
    return Unavailable(
        "the state service could not serve the request", reason="UPSTREAM_ERROR", internal=True
    )


def coalescing_stub(channel: grpc.Channel, **options: int) -> state_pb2_grpc.StateServiceStub:
    """A state replica's stub whose Execute is carried by ExecuteBatch (ExecuteCoalescer)."""
    stub = state_pb2_grpc.StateServiceStub(channel)
    # Called as `forward` and `call` call a unary method: (request, timeout=, metadata=).
    stub.Execute = ExecuteCoalescer(stub.ExecuteBatch, stub.Execute, **options)  # type: ignore[assignment]
    return stub
