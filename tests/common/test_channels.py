"""Outbound calls carry deadlines and retry only UNAVAILABLE."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from veil.services.common.channels import call


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Method:
    def __init__(self, failures: list[grpc.StatusCode]):
        self.failures = failures
        self.timeouts: list[float] = []

    def __call__(self, request: Any, *, timeout: float, metadata: Any = None) -> str:
        self.timeouts.append(timeout)
        if self.failures:
            raise _Failure(self.failures.pop(0))
        return "ok"


def test_unavailable_is_retried_with_a_deadline_on_every_attempt() -> None:
    method = _Method([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    assert call(method, object(), timeout=5) == "ok"
    assert len(method.timeouts) == 3
    assert all(0 < t <= 5 for t in method.timeouts)


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_failures_are_not_retried(code: grpc.StatusCode) -> None:
    method = _Method([code])
    with pytest.raises(_Failure):
        call(method, object(), timeout=5)
    assert len(method.timeouts) == 1


def test_retries_stop_after_the_attempt_budget() -> None:
    method = _Method([grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(_Failure):
        call(method, object(), timeout=5, attempts=3)
    assert len(method.timeouts) == 3


def test_retries_stop_at_the_overall_deadline_however_many_attempts_are_left() -> None:
    method = _Method([grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(_Failure):
        call(method, object(), timeout=0.2, attempts=100)
    # Backing off from 50 ms, doubling: the deadline ends the retries long before the budget.
    assert 1 < len(method.timeouts) < 100
    assert all(0 < t <= 0.2 for t in method.timeouts)
