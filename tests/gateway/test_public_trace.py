"""A public caller's traceparent and baggage do not cross into internal services (issue 17).

Over the gateway's public port an anonymous caller sends a traceparent naming a trace of its
choosing and baggage. The state replica behind the gateway must see neither: the gateway starts
a new trace (its span links to the caller's) and passes no baggage on. A mesh caller (mTLS,
with a certificate) still continues its trace.

That is with tracing on. With tracing off (no exporter configured, the default) no tracing
interceptor exists anywhere: nothing of any caller's trace context reaches the state replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import tls_for
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common import channels as channels_module
from veil.services.common import server as server_module
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.common.tracing import make_tracer_provider
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.server import create_server as create_gateway
from veil.services.state.server import StateServicer, build_state_server
from veil.state.v1 import state_pb2

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
BAGGAGE = "tenant=other-tenant,role=admin"


class _RecordingState(StateServicer):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        self.seen.append(dict(context.invocation_metadata()))
        return state_pb2.PingResponse(payload=request.payload)


def _start(
    service_config: Callable[[str], ServiceConfig], provider: TracerProvider | None
) -> Iterator[tuple[VeilServer, _RecordingState]]:
    recorder = _RecordingState()
    state = build_state_server(service_config("state"), recorder, tracer_provider=provider)
    state.start()
    state.set_serving(True)
    gateway, _ = create_gateway(
        service_config("gateway"),
        gateway=GatewayConfig((f"127.0.0.1:{state.port}",), "127.0.0.1:1", public_listen="127.0.0.1:0"),
        tracer_provider=provider,
    )
    gateway.start()
    yield gateway, recorder
    gateway.stop(0)
    state.stop(0)


@pytest.fixture
def mesh(
    service_config: Callable[[str], ServiceConfig],
) -> Iterator[tuple[VeilServer, _RecordingState, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    for gateway, recorder in _start(service_config, make_tracer_provider("test", exporter)):
        yield gateway, recorder, exporter


@pytest.fixture
def untraced(
    service_config: Callable[[str], ServiceConfig], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[VeilServer, _RecordingState]]:
    """The same mesh with tracing off; building a tracing interceptor fails the test."""

    def refuse(*_args: object) -> None:
        raise AssertionError("a tracing interceptor was installed with tracing off")

    monkeypatch.setattr(server_module, "server_tracing_interceptor", refuse)
    monkeypatch.setattr(channels_module, "traced_channel", refuse)
    yield from _start(service_config, None)


def _ping(channel: grpc.Channel) -> None:
    gateway_pb2_grpc.GatewayServiceStub(channel).Ping(
        gateway_pb2.PingRequest(instance_id="coins", payload=b"x"),
        metadata=(("traceparent", TRACEPARENT), ("baggage", BAGGAGE)),
        timeout=10,
    )


def test_a_public_caller_starts_a_new_trace_and_its_baggage_stops_at_the_gateway(
    mesh: tuple[VeilServer, _RecordingState, InMemorySpanExporter], pki_dir: Path
) -> None:
    gateway, recorder, exporter = mesh
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{gateway.public_port}", credentials) as channel:
        _ping(channel)
    (seen,) = recorder.seen
    assert "baggage" not in seen
    assert CALLER_TRACE not in seen.get("traceparent", "")
    assert BAGGAGE not in str(seen)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    gateway_span = spans["/veil.gateway.v1.GatewayService/Ping"]
    assert gateway_span.parent is None  # a root, not a child of the caller's span
    assert format(gateway_span.context.trace_id, "032x") != CALLER_TRACE
    # The caller's trace is kept as a link, for whoever follows the public side.
    assert [
        (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x"))
        for link in gateway_span.links
    ] == [(CALLER_TRACE, CALLER_SPAN)]
    state_span = spans["/veil.state.v1.StateService/Ping"]
    assert state_span.context.trace_id == gateway_span.context.trace_id  # inside the mesh, one trace


def test_a_mesh_caller_continues_its_trace(
    mesh: tuple[VeilServer, _RecordingState, InMemorySpanExporter], pki_dir: Path
) -> None:
    gateway, recorder, _ = mesh
    with secure_channel(f"127.0.0.1:{gateway.port}", tls_for(pki_dir, "admin")) as channel:
        _ping(channel)
    (seen,) = recorder.seen
    assert CALLER_TRACE in seen["traceparent"]


def test_without_tracing_no_caller_s_trace_context_reaches_the_state(
    untraced: tuple[VeilServer, _RecordingState], pki_dir: Path
) -> None:
    gateway, recorder = untraced
    public = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{gateway.public_port}", public) as channel:
        _ping(channel)
    with secure_channel(f"127.0.0.1:{gateway.port}", tls_for(pki_dir, "admin")) as channel:
        _ping(channel)
    assert len(recorder.seen) == 2
    for seen in recorder.seen:  # neither the public caller's nor a mesh caller's
        assert "traceparent" not in seen
        assert "baggage" not in seen
        assert CALLER_TRACE not in str(seen)
        assert BAGGAGE not in str(seen)
