"""One trace spans client → gateway → state: W3C trace context crosses every hop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import ping_only_state_server, tls_for
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.tracing import make_tracer_provider, not_health_check
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.server import create_server as create_gateway


def test_one_trace_id_spans_gateway_and_state(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("test", exporter)
    state = ping_only_state_server(service_config("state"), tracer_provider=provider)
    state_port = state.port
    state.start()
    gateway, gateway_port = create_gateway(
        service_config("gateway"),
        gateway=GatewayConfig((f"127.0.0.1:{state_port}",), "127.0.0.1:1"),
        tracer_provider=provider,
    )
    gateway.start()
    try:
        channel = secure_channel(f"127.0.0.1:{gateway_port}", tls_for(pki_dir, "admin"), provider)
        with channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).GetStatus(
                gateway_pb2.GetStatusRequest(), timeout=10
            )
        assert [s.address for s in reply.shards] == [f"127.0.0.1:{state_port}"]
    finally:
        gateway.stop(0)
        state.stop(0)

    spans = exporter.get_finished_spans()
    names = {span.name for span in spans}
    assert "/veil.gateway.v1.GatewayService/GetStatus" in names
    assert "/veil.state.v1.StateService/GetStatus" in names
    assert len({span.context.trace_id for span in spans}) == 1, [(s.name, s.context.trace_id) for s in spans]
    # Health checks are never traced.
    assert not any("grpc.health" in name for name in names)


def test_health_checks_are_filtered_out_on_both_sides() -> None:
    class Server:  # grpc.HandlerCallDetails: `method`
        method = "/grpc.health.v1.Health/Check"

    class Client:  # grpcext's client info: `full_method`, sometimes bytes
        full_method = b"/grpc.health.v1.Health/Watch"
        method = None

    class Other:
        method = "/veil.gateway.v1.GatewayService/Execute"

    assert not not_health_check(Server())
    assert not not_health_check(Client())
    assert not_health_check(Other())
