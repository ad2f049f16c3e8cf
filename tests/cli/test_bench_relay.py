"""Issue 13: the bench's bare two-hop relay answers byte for byte, a window with errors yields
no ratio, and CPU per call sums every measured process."""

from __future__ import annotations

import argparse
import os

import grpc
import pytest

from veil.dev.bench import CpuMeter, RunResult, _ratio, cpu_line, cpu_pid
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


def test_cpu_per_call_is_every_measured_process_over_the_calls() -> None:
    before = {"gateway": 10.0, "enclave": 4.0, "bench": 1.0}
    after = {"gateway": 10.5, "enclave": 4.25, "bench": 1.25}  # 1 CPU second in all
    assert CpuMeter.ms_per_call(before, after, 500) == 2.0
    assert CpuMeter.ms_per_call(before, after, 0) is None  # a window without calls


def test_the_cpu_line_says_when_the_mesh_was_not_measured() -> None:
    windows = {"confidential": 0.5, "baseline": 0.35, "relay": 1.32}
    alone = cpu_line({"cpu_measured": ["bench", "relay"], "cpu_ms_per_call": windows})
    assert alone.startswith("CPU per call over bench, relay: confidential 0.50 ms")
    assert "not counted: name them with --cpu-pid" in alone
    whole = cpu_line({"cpu_measured": ["bench", "gateway", "relay"], "cpu_ms_per_call": windows})
    assert "not counted" not in whole


def test_a_cpu_pid_names_live_local_processes() -> None:
    assert cpu_pid(f"me={os.getpid()}") == ("me", [os.getpid()])
    for bad in ("gateway", "=1", "x=abc", f"gw={os.getpid()},999999999"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_pid(bad)
