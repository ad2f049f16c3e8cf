"""A coalesced command's Answer keeps the Future contract its callers rely on."""

from __future__ import annotations

import threading
from concurrent.futures import InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from veil.enclave.v1 import envelope_pb2
from veil.services.gateway.upstream import Answer
from veil.state.v1 import state_pb2


def _response(sequence: int) -> state_pb2.ExecuteResponse:
    return state_pb2.ExecuteResponse(outcome=envelope_pb2.CommandOutcome(sequence=sequence))


def test_callbacks_run_once_answered_or_at_once_when_answered_already() -> None:
    answer = Answer()
    seen: list[str] = []
    answer.add_done_callback(lambda a: seen.append(f"before {a.result().outcome.sequence}"))
    assert not answer.done()
    assert seen == []
    answer.set_result(_response(7))
    answer.add_done_callback(lambda a: seen.append(f"after {a.exception()}"))
    assert answer.done()
    assert seen == ["before 7", "after None"]


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    answer = Answer()
    seen: list[BaseException | None] = []

    def broken(_: Answer) -> None:
        raise RuntimeError("callback bug")

    answer.add_done_callback(broken)
    answer.add_done_callback(lambda a: seen.append(a.exception()))
    error = ValueError("refused")
    answer.set_exception(error)  # the setter (the coalescer's reader) never sees the callback's error
    assert seen == [error]
    assert "exception calling callback" in caplog.text
    with pytest.raises(ValueError, match="refused"):
        answer.result()


def test_one_answer_only_and_waiters_time_out_or_wake() -> None:
    answer = Answer()
    with pytest.raises(FutureTimeout):
        answer.result(timeout=0.01)
    with pytest.raises(FutureTimeout):
        answer.exception(timeout=0)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(answer.result(timeout=30).outcome.sequence))
    waiter.start()
    answer.set_result(_response(3))
    waiter.join()
    assert got == [3]
    assert answer.result(timeout=0).outcome.sequence == 3  # it stays answered
    with pytest.raises(InvalidStateError):
        answer.set_exception(RuntimeError("late"))


def test_an_answered_answer_never_times_out_while_others_read_it() -> None:
    """Readers take and give back the ready lock; a reader that found it held by another one
    timed out although the answer was there (a Future answers at once once it is done)."""
    answer = Answer()
    response = state_pb2.ExecuteResponse()
    answer.set_result(response)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            answer.result()

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        assert all(answer.result(timeout=0) is response for _ in range(20_000))
    finally:
        stop.set()
        for reader in readers:
            reader.join()
