"""Issue 13: the bench's bare two-hop relay answers byte for byte, and a window with errors
yields no ratio."""

from __future__ import annotations

import grpc

from veil.dev.bench import RunResult, _ratio
from veil.dev.relay import METHOD, running_relay


def test_relay_echoes_through_proxy_and_backend() -> None:
    with running_relay() as (target, pids), grpc.insecure_channel(target) as channel:
        assert len(set(pids)) == 2
        echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        assert echo(b"\x00sealed\xff" * 40, timeout=10) == b"\x00sealed\xff" * 40


def test_no_ratio_over_a_window_with_errors() -> None:
    clean = RunResult(latencies=[0.01] * 30)
    assert _ratio(RunResult(latencies=[0.01] * 15), clean) == 0.5
    refused = RunResult(latencies=[0.01] * 15, errors={"RESOURCE_EXHAUSTED": 1})
    assert _ratio(refused, clean) is None
    assert _ratio(clean, refused) is None
    assert _ratio(clean, RunResult()) is None
