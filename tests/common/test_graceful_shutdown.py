"""SIGTERM → NOT_SERVING → in-flight calls finish within the grace period → exit 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import REPO_ROOT, tls_for
from veil.services.common.channels import secure_channel
from veil.state.v1 import state_pb2, state_pb2_grpc


def test_sigterm_drains_an_in_flight_call(pki_dir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests/common/slow_state_server.py"), str(pki_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    ) as process:
        _drain_while_in_flight(process, pki_dir)


def _drain_while_in_flight(process: subprocess.Popen[str], pki_dir: Path) -> None:
    try:
        assert process.stdout is not None
        port, admin_port = (int(p) for p in process.stdout.readline().split())
        with secure_channel(f"127.0.0.1:{port}", tls_for(pki_dir, "gateway")) as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(stub.Ping, state_pb2.PingRequest(payload=b"slow"), timeout=10)
                time.sleep(0.5)  # the call is now inside the handler
                process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as admin:
                    health = health_pb2_grpc.HealthStub(admin).Check(  # type: ignore[attr-defined]  # stub sets methods in __init__
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Ping(state_pb2.PingRequest(payload=b"late"), timeout=2)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert in_flight.result().payload == b"slow"
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait()
