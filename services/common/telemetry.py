"""What a service exports of its traces and metrics, from OpenTelemetry's standard variables.

Nothing is configured by default, and then nothing is built: no tracer provider (so
`build_server` and `secure_channel` install no tracing interceptors and a call pays nothing
for tracing), no meter provider (so the services' metric seams cost one `None` check).

- `OTEL_TRACES_EXPORTER`: `none` (default), `otlp` (OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT`,
  default `http://localhost:4317`, its other `OTEL_EXPORTER_OTLP_*` settings read by the
  exporter itself) or `console` (stdout, for debugging); a comma-separated list sends to each.
- `OTEL_TRACES_SAMPLER` (only with an exporter): `parentbased_traceidratio` (default),
  `parentbased_always_on`, `parentbased_always_off`, `traceidratio`, `always_on`, `always_off`;
  `OTEL_TRACES_SAMPLER_ARG` is the ratio, 0 to 1 (default 1). Parent-based: a mesh caller's
  decision is followed; a public caller never has one (its call starts a new trace, see
  `veil.services.common.tracing`), so the ratio decides for it.
- `OTEL_METRICS_EXPORTER`: `none` (default), `otlp` or `console`, every
  `OTEL_METRIC_EXPORT_INTERVAL` ms (default 60,000).
- `OTEL_SDK_DISABLED=true` turns both off whatever else is set.

A value the service does not know is a start-up error (`ConfigError`), not a silent default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from veil.services.common.config import (
    ENV_OTEL_METRICS_EXPORTER,
    ENV_OTEL_SDK_DISABLED,
    ENV_OTEL_TRACES_EXPORTER,
    ENV_OTEL_TRACES_SAMPLER,
    ENV_OTEL_TRACES_SAMPLER_ARG,
    ConfigError,
)
from veil.services.common.tracing import make_tracer_provider, service_resource

NONE = "none"
OTLP = "otlp"
CONSOLE = "console"
EXPORTERS = (NONE, OTLP, CONSOLE)
DEFAULT_SAMPLER = "parentbased_traceidratio"
SAMPLERS = (
    "parentbased_traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "traceidratio",
    "always_on",
    "always_off",
)


def _exporters(env: Mapping[str, str], variable: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in env.get(variable, NONE).split(",") if n.strip()))
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigError(
            f"{variable}: unknown exporter {unknown[0]!r}; expected a list of {', '.join(EXPORTERS)}"
        )
    if NONE in names and len(names) > 1:
        raise ConfigError(f"{variable}: 'none' cannot be combined with an exporter")
    return tuple(n for n in names if n != NONE)


@dataclass(frozen=True)
class TelemetryConfig:
    """Which exporters get the traces and the metrics, and how traces are sampled."""

    traces_exporters: tuple[str, ...] = ()
    metrics_exporters: tuple[str, ...] = ()
    sampler: str = DEFAULT_SAMPLER
    ratio: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetryConfig:
        env = os.environ if env is None else env
        if env.get(ENV_OTEL_SDK_DISABLED, "").strip().lower() == "true":
            return cls()
        sampler = env.get(ENV_OTEL_TRACES_SAMPLER, DEFAULT_SAMPLER).strip().lower() or DEFAULT_SAMPLER
        if sampler not in SAMPLERS:
            raise ConfigError(
                f"{ENV_OTEL_TRACES_SAMPLER}: unknown sampler {sampler!r}; "
                f"expected one of {', '.join(SAMPLERS)}"
            )
        raw_ratio = env.get(ENV_OTEL_TRACES_SAMPLER_ARG, "").strip()
        try:
            ratio = float(raw_ratio) if raw_ratio else 1.0
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"{ENV_OTEL_TRACES_SAMPLER_ARG} must be a ratio from 0 to 1, not {raw_ratio!r}")
        return cls(
            traces_exporters=_exporters(env, ENV_OTEL_TRACES_EXPORTER),
            metrics_exporters=_exporters(env, ENV_OTEL_METRICS_EXPORTER),
            sampler=sampler,
            ratio=ratio,
        )

    def make_sampler(self) -> Sampler:
        """The sampler named by `sampler`, with `ratio` where it takes one."""
        return {
            "parentbased_traceidratio": lambda: ParentBasedTraceIdRatio(  # type: ignore[no-untyped-call]  # __init__ lacks `-> None`
                self.ratio
            ),
            "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
            "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
            "traceidratio": lambda: TraceIdRatioBased(self.ratio),
            "always_on": lambda: ALWAYS_ON,
            "always_off": lambda: ALWAYS_OFF,
        }[self.sampler]()


def _span_exporter(name: str) -> SpanExporter:
    # Imported on use: a service that exports nothing never loads the OTLP package.
    if name == OTLP:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


def _metric_exporter(name: str) -> MetricExporter:
    if name == OTLP:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    return ConsoleMetricExporter()


def make_meter_provider(service: str, readers: Sequence[MetricReader]) -> MeterProvider:
    """A meter provider naming `service`, read by `readers` (an in-memory one in tests)."""
    return MeterProvider(metric_readers=list(readers), resource=service_resource(service))


@dataclass
class Telemetry:
    """A service's providers: None where nothing is exported (and then nothing is measured)."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @classmethod
    def build(cls, service: str, config: TelemetryConfig) -> Telemetry:
        tracer_provider = None
        if config.traces_exporters:
            exporters = [_span_exporter(name) for name in config.traces_exporters]
            tracer_provider = make_tracer_provider(
                service, *exporters, sampler=config.make_sampler(), batch=True
            )
        meter_provider = None
        if config.metrics_exporters:
            readers = [PeriodicExportingMetricReader(_metric_exporter(n)) for n in config.metrics_exporters]
            meter_provider = make_meter_provider(service, readers)
        return cls(tracer_provider, meter_provider)

    def install_globally(self) -> None:
        """Make the providers the process-wide defaults (a service's main only, never in tests)."""
        if self.tracer_provider is not None:
            trace.set_tracer_provider(self.tracer_provider)
        if self.meter_provider is not None:
            metrics.set_meter_provider(self.meter_provider)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop the exporters."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
