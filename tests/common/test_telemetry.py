"""Telemetry configuration (OpenTelemetry's variables), sampling, and the gateway's refusal counter.

Off by default: no variables, no providers. With a trace exporter the sampler is parent-based
with a ratio: a call that starts a trace is sampled at the ratio, and the state replica behind
the gateway follows the gateway's decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import ping_only_state_server, tls_for
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.call_metrics import CALL_DURATION
from veil.services.common.channels import secure_channel
from veil.services.common.config import ConfigError, ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.common.telemetry import Telemetry, TelemetryConfig, make_meter_provider
from veil.services.common.tracing import make_tracer_provider
from veil.services.gateway.config import DEFAULT_BURST, DEFAULT_RATE, GatewayConfig
from veil.services.gateway.server import create_server as create_gateway

GATEWAY_PING = "/veil.gateway.v1.GatewayService/Ping"
STATE_PING = "/veil.state.v1.StateService/Ping"
SAMPLED_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_nothing_is_exported_or_built_by_default() -> None:
    config = TelemetryConfig.from_env({})
    assert config == TelemetryConfig()
    assert (config.traces_exporters, config.metrics_exporters) == ((), ())
    telemetry = Telemetry.build("gateway", config)
    assert (telemetry.tracer_provider, telemetry.meter_provider) == (None, None)
    assert Telemetry.build("gateway", TelemetryConfig.from_env({"OTEL_TRACES_EXPORTER": "none"})) == telemetry


def test_the_standard_variables_configure_exporters_and_the_sampler() -> None:
    config = TelemetryConfig.from_env(
        {
            "OTEL_TRACES_EXPORTER": "otlp, console",
            "OTEL_METRICS_EXPORTER": "console",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }
    )
    assert config.traces_exporters == ("otlp", "console")
    assert config.metrics_exporters == ("console",)
    assert config.make_sampler().get_description() == (
        "ParentBased{root:TraceIdRatioBased{0.25},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
        "localParentNotSampled:AlwaysOffSampler}"
    )
    telemetry = Telemetry.build("state", config)
    try:
        assert isinstance(telemetry.tracer_provider, TracerProvider)
        assert telemetry.tracer_provider.resource.attributes["service.name"] == "veil-state"
        assert telemetry.meter_provider is not None
    finally:
        telemetry.shutdown()
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp"}
    assert TelemetryConfig.from_env(disabled) == TelemetryConfig()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_TRACES_EXPORTER", "jaeger", "unknown exporter 'jaeger'"),
        ("OTEL_METRICS_EXPORTER", "prometheus", "unknown exporter 'prometheus'"),
        ("OTEL_TRACES_EXPORTER", "none,otlp", "'none' cannot be combined"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "unknown sampler 'sometimes'"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5", "a ratio from 0 to 1"),
        ("OTEL_TRACES_SAMPLER_ARG", "half", "a ratio from 0 to 1"),
        ("OTEL_TRACES_SAMPLER_ARG", "nan", "a ratio from 0 to 1"),
    ],
)
def test_a_value_it_does_not_know_fails_at_start_up(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TelemetryConfig.from_env({variable: value})


def _sampled_at(ratio: float, exporter: InMemorySpanExporter) -> TracerProvider:
    sampler = TelemetryConfig(traces_exporters=("console",), ratio=ratio).make_sampler()
    return make_tracer_provider("test", exporter, sampler=sampler)


class Mesh:
    """Ping-only state replicas with a gateway in front, started with the given providers."""

    def __init__(self, service_config: Callable[[str], ServiceConfig]) -> None:
        self._config = service_config
        self._servers: list[VeilServer] = []

    def start(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        rate_per_second: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
    ) -> VeilServer:
        state = ping_only_state_server(self._config("state"), tracer_provider=tracer_provider)
        state.start()
        self._servers.append(state)
        gateway, _ = create_gateway(
            self._config("gateway"),
            gateway=GatewayConfig(
                (f"127.0.0.1:{state.port}",),
                "127.0.0.1:1",
                public_listen="127.0.0.1:0",
                rate_per_second=rate_per_second,
                burst=burst,
            ),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        gateway.start()
        self._servers.append(gateway)
        return gateway

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop(0)


@pytest.fixture
def mesh(service_config: Callable[[str], ServiceConfig]) -> Iterator[Mesh]:
    started = Mesh(service_config)
    yield started
    started.stop()


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Each metric's data points as the reader collects them now, by metric name."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def _ping(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    gateway_pb2_grpc.GatewayServiceStub(channel).Ping(
        gateway_pb2.PingRequest(instance_id="coins", payload=b"x"), metadata=metadata, timeout=10
    )


def _public(gateway: VeilServer, pki_dir: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{gateway.public_port}", credentials)


def test_new_traces_are_sampled_at_the_ratio_and_the_state_follows(mesh: Mesh, pki_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    gateway = mesh.start(_sampled_at(0.5, exporter))
    calls = 200
    with secure_channel(f"127.0.0.1:{gateway.port}", tls_for(pki_dir, "admin")) as channel:
        for _ in range(calls):
            _ping(channel)  # no traceparent: each call starts a trace at the gateway
    spans = exporter.get_finished_spans()
    gateway_traces = {s.context.trace_id for s in spans if s.name == GATEWAY_PING}
    state_traces = {s.context.trace_id for s in spans if s.name == STATE_PING}
    assert 0.3 * calls < len(gateway_traces) < 0.7 * calls  # trace-id ratio: about half
    assert state_traces == gateway_traces  # parent-based: the replica follows the gateway


def test_a_mesh_caller_s_sampled_trace_is_followed_a_public_one_is_not(mesh: Mesh, pki_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    gateway = mesh.start(_sampled_at(0.0, exporter))
    with _public(gateway, pki_dir) as channel:
        _ping(channel, (("traceparent", SAMPLED_PARENT),))
    assert exporter.get_finished_spans() == ()  # a new trace, at ratio 0: not sampled
    with secure_channel(f"127.0.0.1:{gateway.port}", tls_for(pki_dir, "admin")) as channel:
        _ping(channel, (("traceparent", SAMPLED_PARENT),))
    assert {s.name for s in exporter.get_finished_spans()} == {GATEWAY_PING, STATE_PING}


def test_the_gateway_counts_rate_limited_calls_and_every_call_s_status(mesh: Mesh, pki_dir: Path) -> None:
    reader = InMemoryMetricReader()
    gateway = mesh.start(
        meter_provider=make_meter_provider("gateway", [reader]), rate_per_second=0.01, burst=2
    )
    with _public(gateway, pki_dir) as channel:
        _ping(channel)
        _ping(channel)
        with pytest.raises(grpc.RpcError) as refused:
            _ping(channel)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    points = metric_points(reader)
    assert [(dict(p.attributes), p.value) for p in points["veil.gateway.rate_limited"]] == [
        ({"veil.client.kind": "peer"}, 1)
    ]
    calls = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p.count
        for p in points[CALL_DURATION]
    }
    assert calls == {
        ("Ping", grpc.StatusCode.OK.value[0]): 2,
        ("Ping", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]): 1,
    }
