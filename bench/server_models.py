"""Server CPU per unary call: the sync grpcio server our services use against a `grpc.aio` one.

    python -m bench.server_models [--seconds 5] [--clients 64] [--rounds 2] [--json]

Each model is one server process on 127.0.0.1 (mutual TLS from a fresh dev PKI, the project's
`server_credentials`) serving grpc health `Check`; one client process (`grpc.aio`, mTLS with
the admin certificate) keeps `--clients` calls in flight for a warm-up second, then for
`--seconds`, and reads the server's user+system CPU from /proc at both ends of that window.
Models, run back to back and alternating over `--rounds` (A B C D A B C D) to show the noise:

- `sync`: `grpc.server` on a thread pool, sized and optioned as the gateway's server (its
  workers, concurrency bound and options), no interceptor;
- `sync_chain`: the gateway's real server factory (`build_server`: error mapping with the
  gateway's public presenter, authorization and identity from the peer certificate, request
  size limits; tracing and metrics off, the default);
- `aio`: `grpc.aio.server`, no interceptor;
- `aio_identity`: `grpc.aio.server` with one async interceptor that checks the caller's
  certificate identity and issuer as the authorization interceptor does.

Rate limits are the gateway servicer's, not an interceptor's, so no model has them. Reports per
run calls/s, server and client CPU ms per call, p50/p99 latency, and the median ratio of each
model's server CPU per call to `aio`'s. A benchmark reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer

from veil.dev.bench import CpuMeter, percentile
from veil.dev.pki import admin_tls, init_pki
from veil.services.common.config import ServiceConfig, TlsFiles
from veil.services.common.errors import VeilError
from veil.services.common.identity import AdminIssuer
from veil.services.common.server import _OPTIONS, build_server
from veil.services.common.tls import channel_credentials, server_credentials
from veil.services.gateway import public_errors
from veil.services.gateway.config import DEFAULT_MAX_CONCURRENT_RPCS, GATEWAY_WORKERS

MODELS = ("sync", "sync_chain", "aio", "aio_identity")
BASELINE = "aio"
_WARMUP = 1.0


def _tls(pki: Path) -> TlsFiles:
    return TlsFiles(pki / "gateway.pem", pki / "gateway-key.pem", pki / "ca.pem", pki / "admin-ca.pem")


def _wait_for_stdin_close() -> None:
    sys.stdin.read()


# --- servers (each in its own process) -----------------------------------------------------


def _serve_sync(pki: Path, chain: bool) -> None:
    tls = _tls(pki)
    if chain:
        config = ServiceConfig("gateway", "127.0.0.1:0", "127.0.0.1:0", tls, pki / "data")
        bundle = build_server(
            config,
            register=lambda _server: None,
            service_names=(),
            authorization={},
            max_workers=GATEWAY_WORKERS,
            maximum_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS,
            present_error=public_errors.present,
        )
        bundle.start()
        bundle.set_serving(True)
        print(bundle.port, flush=True)
        _wait_for_stdin_close()
        bundle.stop(0)
        return
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GATEWAY_WORKERS, thread_name_prefix="rpc"),
        options=_OPTIONS,
        maximum_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    server.start()
    print(port, flush=True)
    _wait_for_stdin_close()
    server.stop(0).wait()


class _AsyncIdentityInterceptor(grpc.aio.ServerInterceptor):
    """What `AuthorizationInterceptor` does for an open method, as an aio interceptor: the
    caller's SPIFFE ID from its certificate and the issuer check, before the handler runs."""

    def __init__(self, issuer: AdminIssuer) -> None:
        self._issuer = issuer
        # Wrapped once per method, as our sync `HandlerInterceptor` does: only the check is per call.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrapped.get(handler_call_details.method)
        if wrapped is None:
            wrapped = self._wrapped[handler_call_details.method] = self._wrap(handler)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        inner: Any = handler.unary_unary  # an async handler on an aio server; the stub knows only sync ones
        issuer = self._issuer

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                caller = issuer.identity(cast(grpc.ServicerContext, context))
            except VeilError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            if caller is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _serve_aio(pki: Path, identity: bool) -> None:
    tls = _tls(pki)
    interceptors = [_AsyncIdentityInterceptor(AdminIssuer(tls.admin_ca))] if identity else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=_OPTIONS,
        maximum_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(AsyncHealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, _wait_for_stdin_close)
    await server.stop(0)


def serve(model: str, pki: Path) -> None:
    if model.startswith("aio"):
        asyncio.run(_serve_aio(pki, identity=model == "aio_identity"))
    else:
        _serve_sync(pki, chain=model == "sync_chain")


# --- the client (its own process) ----------------------------------------------------------


async def drive(port: int, pki: Path, server_pid: int, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` calls in flight for a warm-up, then for `seconds`: the window's measurements."""
    meter = CpuMeter({"server": [server_pid]})
    request = health_pb2.HealthCheckRequest()
    latencies: list[float] = []
    errors = 0
    recording = False
    stop = False
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(admin_tls(pki))) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        await check(request, timeout=10)

        async def worker() -> None:
            nonlocal errors
            while not stop:
                began = time.perf_counter()
                try:
                    await check(request, timeout=10)
                except grpc.RpcError:
                    errors += recording
                    continue
                if recording:
                    latencies.append(time.perf_counter() - began)

        tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        await asyncio.sleep(_WARMUP)
        server_before, client_before, wall_before = meter.sample(), time.process_time(), time.perf_counter()
        recording = True
        await asyncio.sleep(seconds)
        recording = False
        server_after, client_after, wall_after = meter.sample(), time.process_time(), time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
    calls = len(latencies)
    per_call = 1000 / calls if calls else 0.0
    return {
        "calls": calls,
        "errors": errors,
        "calls_per_s": round(calls / (wall_after - wall_before), 1),
        "server_cpu_ms_per_call": round((server_after["server"] - server_before["server"]) * per_call, 4),
        "client_cpu_ms_per_call": round((client_after - client_before) * per_call, 4),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


# --- the parent ----------------------------------------------------------------------------


def _module(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.server_models", *args]


def run_model(model: str, pki: Path, clients: int, seconds: float) -> dict[str, Any]:
    """One window of `model`: a fresh server process and a fresh client process."""
    server = subprocess.Popen(  # noqa: S603 - this module
        _module("--serve", model, "--pki", str(pki)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdin is not None
        port = int(server.stdout.readline())
        done = subprocess.run(  # noqa: S603 - this module
            _module(
                "--drive",
                str(port),
                "--pki",
                str(pki),
                "--server-pid",
                str(server.pid),
                "--clients",
                str(clients),
                "--seconds",
                str(seconds),
            ),
            capture_output=True,
            text=True,
            check=True,
        )
        server.stdin.close()
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    result: dict[str, Any] = {"model": model, **json.loads(done.stdout)}
    return result


def ratios(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median server CPU per call of each model over the baseline's median."""
    medians = {
        model: statistics.median(r["server_cpu_ms_per_call"] for r in runs if r["model"] == model)
        for model in dict.fromkeys(r["model"] for r in runs)
    }
    base = medians.get(BASELINE)
    if not base:
        return {}
    return {f"{model}/{BASELINE}": round(value / base, 2) for model, value in medians.items()}


def table(runs: Sequence[dict[str, Any]]) -> str:
    head = ("model", "calls/s", "server ms/call", "client ms/call", "p50 ms", "p99 ms", "errors")
    keys = (
        "model",
        "calls_per_s",
        "server_cpu_ms_per_call",
        "client_cpu_ms_per_call",
        "p50_ms",
        "p99_ms",
        "errors",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in runs]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--serve", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.pki)
        return 0
    if args.drive:
        print(
            json.dumps(asyncio.run(drive(args.drive, args.pki, args.server_pid, args.clients, args.seconds)))
        )
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="veil-server-models-") as tmp:
        pki = Path(tmp)
        init_pki(pki)
        for round_ in range(args.rounds):
            for model in models:
                print(f"bench.server_models: round {round_ + 1}, {model}", file=sys.stderr, flush=True)
                runs.append(run_model(model, pki, args.clients, args.seconds))
    report = {
        "clients": args.clients,
        "seconds": args.seconds,
        "grpcio": grpc.__version__,
        "runs": runs,
        "server_cpu_ratios": ratios(runs),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(runs))
        print("server CPU per call, median over rounds:", report["server_cpu_ratios"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
