"""The state host's OpenTelemetry metrics, read through an in-memory reader from a real server.

A state server (real keyvault, in-process enclave, SQLite) created with a meter provider runs a
few token commands; the batch size, ECALL and commit duration histograms, the head-advance
counter, the head lag and queue depth gauges and the per-call durations all come from the same
`record_*` seams GetStatus reports.
"""

from __future__ import annotations

import time

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.common.test_telemetry import metric_points
from tests.conftest import tls_for
from tests.state.support import Node, token_issuer_served
from veil.dev.loadclient import mint
from veil.services.common.call_metrics import CALL_DURATION
from veil.services.common.channels import secure_channel
from veil.services.common.telemetry import make_meter_provider
from veil.services.state import lifecycle
from veil.services.state.runner import in_process_enclave
from veil.services.state.server import create_server
from veil.state.v1 import state_pb2, state_pb2_grpc

COMMANDS = 5


def test_a_state_host_exports_its_metrics(node: Node) -> None:
    reader = InMemoryMetricReader()
    settings = node.config("a")
    server, port = create_server(
        node.base,
        state_config=settings,
        enclave_factory=lambda: in_process_enclave(settings),
        meter_provider=make_meter_provider("state", [reader]),
    )
    server.start()
    try:
        with secure_channel(f"127.0.0.1:{port}", tls_for(node.pki_dir, "gateway")) as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            for _ in range(300):
                if stub.GetStatus(state_pb2.GetStatusRequest(), timeout=5).step == lifecycle.SERVING:
                    break
                time.sleep(0.05)
            issuer = token_issuer_served(stub, "coins")
            for _ in range(COMMANDS):
                sealed = issuer.seal(mint("someone", 1))
                stub.Execute(
                    state_pb2.ExecuteRequest(
                        instance_id="coins", command=sealed.command, request_id=sealed.request_id
                    ),
                    timeout=10,
                )
        with secure_channel(f"127.0.0.1:{port}", tls_for(node.pki_dir, "admin")) as channel:
            with pytest.raises(grpc.RpcError) as refused:  # only the gateway may call
                state_pb2_grpc.StateServiceStub(channel).Ping(state_pb2.PingRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(1)

    points = metric_points(reader)
    (batches,) = points["veil.state.batch.size"]
    assert batches.sum == COMMANDS  # one at a time: each Execute waited for its answer
    (ecalls,) = points["veil.state.ecall.duration"]
    assert ecalls.count == COMMANDS
    assert ecalls.sum > 0
    (commits,) = points["veil.state.commit.duration"]
    assert commits.count >= COMMANDS  # the instance's creation commits too
    advanced = {p.attributes["outcome"]: p.value for p in points["veil.state.head.advances"]}
    assert advanced["ok"] >= 1  # strict answers wait for the keyvault head
    assert [p.value for p in points["veil.state.head.lag"]] == [0]  # stopped: no runtime left
    assert [p.value for p in points["veil.state.batcher.queue_depth"]] == [0]
    calls = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p.count
        for p in points[CALL_DURATION]
    }
    assert calls[("Execute", grpc.StatusCode.OK.value[0])] == COMMANDS
    assert calls[("Ping", grpc.StatusCode.PERMISSION_DENIED.value[0])] == 1
    assert not any(name.startswith("grpc.health") for name, _ in calls)  # probes are not measured
