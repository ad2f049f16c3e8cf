"""OpenTelemetry tracing: one provider per process, W3C trace context on every hop.

Server and client interceptors come from opentelemetry-instrumentation-grpc; health
checks are not traced (Kubernetes probes would drown the real traffic). They are installed only
with a provider: a service without a trace exporter (veil.services.common.telemetry) gets none,
so its calls pay nothing for tracing and carry no trace context at all.

Only mesh callers (a verified client certificate) continue their trace: a caller without one
(the gateway's public port) could otherwise pick the trace ids internal services log under and
push `baggage` through every hop. Its call starts a new trace, linked to the caller's
`traceparent` when that parses, and its baggage is dropped.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext
from opentelemetry.instrumentation.grpc._server import OpenTelemetryServerInterceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_HEALTH_SERVICE = "grpc.health.v1.Health"
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.11.0"  # what the instrumentation's own factory uses


def not_health_check(details: Any) -> bool:
    """True unless the call is a health check: OTel's `negate(health_check())`, without its
    isinstance test against a typing.Protocol on every client call (profiled at about 5% of a
    service's Python time under load)."""
    name = getattr(details, "full_method", None) or getattr(details, "method", "") or ""
    if isinstance(name, bytes):
        name = name.decode()
    return not str(name).lstrip("/").startswith(_HEALTH_SERVICE)


def service_resource(service: str) -> Resource:
    """What every span and metric of `service` is attributed to."""
    return Resource.create({"service.name": f"veil-{service}"})


def make_tracer_provider(
    service: str, *exporters: SpanExporter, sampler: Sampler | None = None, batch: bool = False
) -> TracerProvider:
    """A provider naming `service`; spans go to each of `exporters` (tests, collectors): at once,
    or (`batch`, a service's own) from a background thread off the call path. `sampler` defaults
    to parent-based always-on (every root sampled, a parent's decision followed)."""
    provider = TracerProvider(resource=service_resource(service), sampler=sampler or ParentBased(ALWAYS_ON))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


# The trace a public caller named, while its call's span starts (linked, not continued).
_PUBLIC_CALLER: contextvars.ContextVar[trace.SpanContext | None] = contextvars.ContextVar(
    "veil_public_caller", default=None
)


def _has_certificate(context: grpc.ServicerContext) -> bool:
    # The stub says Mapping[str, bytes]; gRPC really maps each property to a list of values.
    return bool(cast(Mapping[str, list[bytes]], context.auth_context()).get("x509_pem_cert"))


class _ServerInterceptor(OpenTelemetryServerInterceptor):
    """OTel's server interceptor, continuing a trace only for callers with a certificate."""

    @contextmanager
    def _set_remote_context(self, servicer_context: grpc.ServicerContext) -> Iterator[None]:
        if _has_certificate(servicer_context):
            with super()._set_remote_context(servicer_context):
                yield
            return
        metadata = {
            key: value
            for key, value in servicer_context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        caller = trace.get_current_span(TraceContextTextMapPropagator().extract(metadata)).get_span_context()
        # An empty context: a new root span, and no baggage to pass on downstream.
        token = otel_context.attach(otel_context.Context())
        mark = _PUBLIC_CALLER.set(caller if caller.is_valid else None)
        try:
            yield
        finally:
            _PUBLIC_CALLER.reset(mark)
            otel_context.detach(token)

    @contextmanager
    def _start_span(
        self, handler_call_details: Any, context: grpc.ServicerContext, set_status_on_exception: bool = False
    ) -> Iterator[trace.Span]:
        start = super()._start_span(  # type: ignore[no-untyped-call]  # unannotated base
            handler_call_details, context, set_status_on_exception
        )
        with start as span:
            caller = _PUBLIC_CALLER.get()
            if caller is not None:
                span.add_link(caller, {"veil.link": "public caller's traceparent"})
            yield span


def server_tracing_interceptor(provider: TracerProvider) -> grpc.ServerInterceptor:
    """Opens a server span (health checks excluded), in the caller's trace for mesh callers."""
    tracer = trace.get_tracer(
        "opentelemetry.instrumentation.grpc", tracer_provider=provider, schema_url=_SCHEMA_URL
    )
    interceptor: grpc.ServerInterceptor = _ServerInterceptor(  # type: ignore[no-untyped-call]  # unannotated base
        tracer, filter_=not_health_check
    )
    return interceptor


def traced_channel(channel: grpc.Channel, provider: TracerProvider) -> grpc.Channel:
    """Wrap `channel` so every call opens a client span and injects traceparent."""
    interceptor: Any = client_interceptor(  # type: ignore[no-untyped-call]  # package is unannotated
        tracer_provider=provider, filter_=not_health_check
    )
    traced: grpc.Channel = grpcext.intercept_channel(channel, interceptor)  # type: ignore[no-untyped-call]
    return traced
