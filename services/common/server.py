"""The server factory every Veil service uses, and graceful shutdown.

A service's `create_server(config)` builds its server with `build_server` (through its
`HostedService`: the service's name, authorization table and generated registration, with
its servicer) and gets back a `VeilServer`: the mTLS main server (health,
reflection, tracing, authorization, error mapping) plus a plaintext admin server
with only health and reflection, for Kubernetes gRPC probes and local debugging.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Generic, TypedDict, TypeVar, Unpack

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from veil.services.common.call_metrics import CallMetricsInterceptor
from veil.services.common.config import ADMIN_CA, ServiceConfig, env_name
from veil.services.common.decoding import DecodeInterceptor
from veil.services.common.errors import ErrorInterceptor, Presenter
from veil.services.common.health import ListingHealthServicer
from veil.services.common.identity import AdminIssuer, AuthorizationInterceptor, AuthorizationTable
from veil.services.common.tls import server_credentials
from veil.services.common.tracing import server_tracing_interceptor

_log = logging.getLogger(__name__)

S = TypeVar("S")

SERVING = health_pb2.HealthCheckResponse.SERVING
# Kubernetes liveness asks for this health name: SERVING for as long as the process runs,
# even while the service is not ready (recovering, waiting for the keyvault, FAILED with a
# reason), so a replica that is alive but not ready is not restarted in a loop.
LIVENESS_SERVICE = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CONCURRENT_RPCS_PER_WORKER = 4
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass
class VeilServer:
    """A started-or-not pair of servers sharing one health servicer."""

    main: grpc.Server
    port: int
    admin: grpc.Server
    admin_port: int
    health: health.HealthServicer
    service_names: Sequence[str]
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    public_port: int | None = None

    def start(self) -> None:
        self.main.start()
        self.admin.start()

    def set_serving(self, serving: bool) -> None:
        """Report SERVING (or NOT_SERVING) for the whole server and each of its services."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then stop."""
        self.health.enter_graceful_shutdown()
        self.main.stop(grace).wait()
        self.admin.stop(0).wait()
        for hook in self.on_stop:
            hook()

    def wait(self) -> None:
        self.main.wait_for_termination()


def _add_health_and_reflection(
    server: grpc.Server, servicer: health.HealthServicer, names: Sequence[str]
) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpcio's "Failed to bind": say what an operator can act on
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or the address is not local")
    return port


def build_server(
    config: ServiceConfig,
    *,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    authorization: AuthorizationTable,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    max_workers: int = 32,
    max_request_bytes: int = MAX_MESSAGE_BYTES,
    public_listen: str | None = None,
    maximum_concurrent_rpcs: int | None = None,
    present_error: Presenter | None = None,
) -> VeilServer:
    """Assemble (not start) the main mTLS server and the plaintext admin server.

    `public_listen` (the gateway's alone) adds a second, TLS-only listener for clients without
    a certificate, served by the same server: only methods the `authorization` table marks
    `PUBLIC` admit them. Every other service passes none and stays strictly mTLS.

    Calls in flight (running or waiting for one of the `max_workers` threads) are bounded by
    `maximum_concurrent_rpcs` (default four per thread): past it gRPC refuses a new call with
    RESOURCE_EXHAUSTED at once, instead of queueing it beyond any deadline.

    `present_error` decides what a caller sees of a domain error (the gateway's public face).

    Calls are traced only with a `tracer_provider`, and measured (duration and status by
    method) only with a `meter_provider` (veil.services.common.telemetry): without them no
    tracing or metrics interceptor is installed at all.
    """
    main = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{config.service}-rpc"),
        interceptors=[
            # Tracing only with a provider (an exporter is configured): otherwise no interceptor.
            *([server_tracing_interceptor(tracer_provider)] if tracer_provider is not None else []),
            *([CallMetricsInterceptor(meter_provider)] if meter_provider is not None else []),
            ErrorInterceptor(present_error),
            AuthorizationInterceptor(
                authorization, AdminIssuer(config.tls.admin_ca, env_name(config.service, ADMIN_CA))
            ),
            DecodeInterceptor(max_request_bytes),
        ],
        options=_OPTIONS,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs or CONCURRENT_RPCS_PER_WORKER * max_workers,
    )
    health_servicer = ListingHealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
    )
    register(main)
    _add_health_and_reflection(main, health_servicer, service_names)
    port = _bind(main, config.listen, server_credentials(config.tls))
    public_port = (
        _bind(main, public_listen, server_credentials(config.tls, require_client_auth=False))
        if public_listen
        else None
    )

    admin = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin"), options=_OPTIONS
    )
    _add_health_and_reflection(admin, health_servicer, ())  # it serves health only: reflect only that
    admin_port = _bind(admin, config.admin_listen, None)

    bundle = VeilServer(
        main, port, admin, admin_port, health_servicer, service_names, public_port=public_port
    )
    bundle.set_serving(False)
    health_servicer.set(LIVENESS_SERVICE, SERVING)
    return bundle


class ServerOptions(TypedDict, total=False):
    """The optional settings of `build_server`, for callers that pass them through."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    max_workers: int
    max_request_bytes: int
    public_listen: str | None
    maximum_concurrent_rpcs: int | None
    present_error: Presenter | None


@dataclass(frozen=True)
class HostedService(Generic[S]):
    """One generated gRPC service as a Veil server hosts it: its full name (health and
    reflection), who may call each method, and the generated `add_*Servicer_to_server`."""

    name: str
    authorization: AuthorizationTable
    add_servicer: Callable[[S, grpc.Server], None]

    def build_server(
        self, config: ServiceConfig, servicer: S, **options: Unpack[ServerOptions]
    ) -> VeilServer:
        """`build_server` for this service alone, served by `servicer`."""
        return build_server(
            config,
            register=lambda server: self.add_servicer(servicer, server),
            service_names=[self.name],
            authorization=self.authorization,
            **options,
        )


def run_until_signalled(server: VeilServer, grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then report NOT_SERVING and drain within `grace`."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        _log.info("received %s: NOT_SERVING, draining for up to %.1fs", signal.Signals(signum).name, grace)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(grace)
    _log.info("stopped")
