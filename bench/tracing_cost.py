"""What tracing and metrics cost per call: `Ping` through an in-process gateway and state replica.

    python -m bench.tracing_cost [--calls 2000] [--rounds 3]

One process holds a Ping-only state replica (no enclave, no storage), a gateway in front of
it (mTLS, the full interceptor chain) and one client calling Ping in a tight loop over mTLS.
Each mode builds a fresh pair of servers and measures the process's CPU time (every thread:
client, gateway, state) and wall time per call; modes alternate over `--rounds` to spread the
machine's noise. Modes: tracing and metrics off (the default: no interceptor), metrics only,
tracing at ratio 0 (interceptors, no span recorded), tracing at ratio 1 (every span recorded
and handed to a batch processor whose exporter drops it), and `before`: what every service ran
before tracing could be turned off (interceptors and a provider sampling every span, with no
exporter). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from veil.dev.pki import init_pki
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig, TlsFiles
from veil.services.common.telemetry import TelemetryConfig, make_meter_provider
from veil.services.common.tracing import make_tracer_provider
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.server import create_server as create_gateway
from veil.services.state.server import StateServicer, build_state_server

MODES = ("off", "metrics", "traces_ratio_0", "traces_ratio_1", "before")


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _config(pki: Path, data: Path, service: str) -> ServiceConfig:
    tls = TlsFiles(pki / f"{service}.pem", pki / f"{service}-key.pem", pki / "ca.pem", pki / "admin-ca.pem")
    return ServiceConfig(service, "127.0.0.1:0", "127.0.0.1:0", tls, data / service, grace_seconds=1.0)


def _providers(mode: str) -> dict[str, Any]:
    if mode == "metrics":
        return {"meter_provider": make_meter_provider("bench", [InMemoryMetricReader()])}
    if mode == "before":
        return {"tracer_provider": make_tracer_provider("bench")}
    if mode.startswith("traces"):
        sampler = TelemetryConfig(traces_exporters=("otlp",), ratio=float(mode[-1])).make_sampler()
        return {"tracer_provider": make_tracer_provider("bench", _Drop(), sampler=sampler, batch=True)}
    return {}


def measure(pki: Path, data: Path, mode: str, calls: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per Ping in `mode`, after a warm-up."""
    providers = _providers(mode)
    state = build_state_server(_config(pki, data, "state"), StateServicer(), **providers)
    state.start()
    state.set_serving(True)
    gateway, port = create_gateway(
        _config(pki, data, "gateway"),
        gateway=GatewayConfig((f"127.0.0.1:{state.port}",), "127.0.0.1:1", rate_per_second=1e9, burst=1e9),
        **providers,
    )
    gateway.start()
    admin = TlsFiles(pki / "admin.pem", pki / "admin-key.pem", pki / "ca.pem")
    try:
        with secure_channel(f"127.0.0.1:{port}", admin) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = gateway_pb2.PingRequest(instance_id="bench", payload=b"x" * 64)
            for _ in range(200):
                stub.Ping(request, timeout=10)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(calls):
                stub.Ping(request, timeout=10)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        gateway.stop(0)
        state.stop(0)
        for provider in providers.values():
            provider.shutdown()
    return 1e6 * cpu / calls, 1e6 * wall / calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="veil-tracing-cost-") as tmp:
        pki = Path(tmp) / "pki"
        init_pki(pki, now=dt.datetime.now(dt.UTC))
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(measure(pki, Path(tmp), mode, args.calls))
    result = {
        mode: {
            "cpu_us_per_call": round(statistics.median(c for c, _ in samples), 1),
            "wall_us_per_call": round(statistics.median(w for _, w in samples), 1),
            "cpu_us_runs": [round(c, 1) for c, _ in samples],
        }
        for mode, samples in runs.items()
    }
    print(json.dumps({"calls": args.calls, "rounds": args.rounds, "modes": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
