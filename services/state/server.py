"""State service server: hosts the enclave; only the gateway identity may call it.

`create_server` opens the store (SQLite under the data dir, or PostgreSQL), the keyvault
channel and the host, and starts the host's start-up in the background: health stays
NOT_SERVING until recovery completes (GetStatus says which step it is in), then SERVING.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import grpc
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from veil.services.common import identity
from veil.services.common.channels import remaining_timeout
from veil.services.common.config import ServiceConfig
from veil.services.common.errors import (
    InvalidArgument,
    VeilError,
    internal_status,
    new_correlation_id,
)
from veil.services.common.main import serve
from veil.services.common.server import HostedService, VeilServer
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.errors import NotServing
from veil.services.state.host import StateHost, not_committed_in_time
from veil.services.state.keyvault_client import KeyvaultClient
from veil.services.state.runner import spawn_enclave
from veil.services.state.store import StateStore, open_store
from veil.state.v1 import state_pb2, state_pb2_grpc

SERVICE_NAME = state_pb2.DESCRIPTOR.services_by_name["StateService"].full_name
EXECUTE_CEILING_S = 30.0
#: Commands one ExecuteBatch may carry (the gateway sends at most its own cap).
MAX_BATCH_COMMANDS = 1024
Answer = state_pb2.ExecuteResponse | Future[state_pb2.ExecuteResponse]
_log = logging.getLogger(__name__)

# Every state RPC is for the gateway alone: clients reach enclaves only through it.
AUTHORIZATION = identity.method_names(
    SERVICE_NAME,
    {
        name: frozenset({identity.GATEWAY})
        for name in state_pb2.DESCRIPTOR.services_by_name["StateService"].methods_by_name
    },
)
HOSTED_SERVICE = HostedService(SERVICE_NAME, AUTHORIZATION, state_pb2_grpc.add_StateServiceServicer_to_server)


class StateServicer(state_pb2_grpc.StateServiceServicer):
    """The StateService RPCs over a `StateHost`. Without a host only Ping (the baseline) answers."""

    def __init__(self, host: StateHost | None = None) -> None:
        self._host = host

    def _require_host(self) -> StateHost:
        if self._host is None:
            raise NotServing("this server hosts no enclave")
        return self._host

    def Execute(
        self, request: state_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> state_pb2.ExecuteResponse:
        host = self._require_host()
        _require_command(request)
        timeout = remaining_timeout(context, EXECUTE_CEILING_S)
        return host.execute(request.instance_id, request.command, request.request_id, timeout)

    def Query(
        self, request: state_pb2.QueryRequest, context: grpc.ServicerContext
    ) -> state_pb2.QueryResponse:
        host = self._require_host()
        _require_command(request)
        return host.query(request.instance_id, request.command, remaining_timeout(context, EXECUTE_CEILING_S))

    def CreateInstance(
        self, request: state_pb2.CreateInstanceRequest, context: grpc.ServicerContext
    ) -> state_pb2.CreateInstanceResponse:
        host = self._require_host()
        if not request.HasField("config"):
            raise InvalidArgument("config is required")
        timeout = remaining_timeout(context, EXECUTE_CEILING_S)
        instance, descriptor = host.create_instance(
            request.instance_id, request.config, request.request_id, timeout
        )
        return state_pb2.CreateInstanceResponse(instance=instance, descriptor=descriptor)

    def ListInstances(
        self, request: state_pb2.ListInstancesRequest, context: grpc.ServicerContext
    ) -> state_pb2.ListInstancesResponse:
        return state_pb2.ListInstancesResponse(instances=self._require_host().list_instances())

    def GetAttestation(
        self, request: state_pb2.GetAttestationRequest, context: grpc.ServicerContext
    ) -> state_pb2.GetAttestationResponse:
        host = self._require_host()
        descriptor = host.descriptor(request.instance_id) if request.instance_id else None
        return state_pb2.GetAttestationResponse(bundle=host.attestation_bundle(), descriptor=descriptor)

    def GetStatus(
        self, request: state_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> state_pb2.GetStatusResponse:
        return self._require_host().status()

    def ExecuteBatch(
        self, request: state_pb2.ExecuteBatchRequest, context: grpc.ServicerContext
    ) -> Iterator[state_pb2.ExecuteBatchResponse]:
        host = self._require_host()
        if len(request.commands) > MAX_BATCH_COMMANDS:
            raise InvalidArgument(f"a batch carries at most {MAX_BATCH_COMMANDS} commands")
        # Every command is queued before any is waited for, so they share the host's batches;
        # each answer leaves as soon as it is ready, all within the call's one deadline.
        deadline = time.monotonic() + remaining_timeout(context, EXECUTE_CEILING_S)
        # A request id repeated inside the batch shares its first command's future.
        pending: dict[Future[state_pb2.ExecuteResponse], list[int]] = {}
        for index, command in enumerate(request.commands):
            answer = _attempt(index, functools.partial(_enqueue, host, command))
            if isinstance(answer, Future):
                pending.setdefault(answer, []).append(index)
            else:
                yield answer
        try:
            for done in concurrent.futures.as_completed(pending, max(deadline - time.monotonic(), 0.0)):
                for index in pending.pop(done):
                    result = _attempt(index, functools.partial(host.wait_for, done, 0.0))
                    assert not isinstance(result, Future)  # a done future's answer or failure
                    yield result
        except concurrent.futures.TimeoutError:
            for late in pending.values():  # the commands may still commit: a retry finds out
                yield from (_result(index, not_committed_in_time()) for index in late)

    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> state_pb2.PingResponse:
        # The transport baseline: acknowledged by the host, no enclave, no storage.
        return state_pb2.PingResponse(payload=request.payload)


def _require_command(request: state_pb2.ExecuteRequest | state_pb2.QueryRequest) -> None:
    """Execute, Query and every command of an ExecuteBatch name an instance and carry a command."""
    if not request.instance_id or not request.HasField("command"):
        raise InvalidArgument("instance_id and command are required")


def _enqueue(host: StateHost, request: state_pb2.ExecuteRequest) -> Answer:
    _require_command(request)
    return host.enqueue(request.instance_id, request.command, request.request_id)


def _attempt(
    index: int, step: Callable[[], Answer]
) -> state_pb2.ExecuteBatchResponse | Future[state_pb2.ExecuteResponse]:
    """`step()` as command `index`'s result (a future passes through), or the status its failure
    maps to, as the error interceptor maps a unary call's: unexpected errors are INTERNAL, logged."""
    try:
        answer = step()
    except VeilError as exc:
        return _result(index, exc)
    except Exception:
        correlation_id = new_correlation_id()
        _log.exception("a batched command failed (correlation id %s)", correlation_id)
        return state_pb2.ExecuteBatchResponse(
            index=index, status=internal_status(correlation_id).SerializeToString()
        )
    if isinstance(answer, state_pb2.ExecuteResponse):
        return state_pb2.ExecuteBatchResponse(index=index, response=answer)
    return answer


def _result(index: int, error: VeilError) -> state_pb2.ExecuteBatchResponse:
    return state_pb2.ExecuteBatchResponse(index=index, status=error.to_status().SerializeToString())


def build_state_server(
    config: ServiceConfig,
    servicer: state_pb2_grpc.StateServiceServicer,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    max_workers: int = 32,
) -> VeilServer:
    """The StateService's server (not started) around `servicer`: the state's authorization
    table, health and reflection for its service name."""
    return HOSTED_SERVICE.build_server(
        config,
        servicer,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        max_workers=max_workers,
    )


def create_server(
    config: ServiceConfig,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    state_config: StateConfig | None = None,
    enclave_factory: Callable[[], EnclaveHost] | None = None,
    store: StateStore | None = None,
) -> tuple[VeilServer, int]:
    """Build the state server (not started) and begin the host's start-up; returns it and its port.

    `state_config` defaults to `StateConfig.from_env`; `enclave_factory` to spawning the
    runner process; `store` to the configured database (closed with the server).
    """
    settings = state_config or StateConfig.from_env(config)
    owned_store = store is None
    store = store if store is not None else open_store(settings.database, schema=settings.database_schema)
    keyvault = KeyvaultClient.connect(settings.keyvault_address, config.tls, tracer_provider=tracer_provider)
    server_box: list[VeilServer] = []

    def health(serving: bool) -> None:
        if server_box:
            server_box[0].set_serving(serving)

    host = StateHost(
        settings,
        store=store,
        keyvault=keyvault,
        enclave_factory=enclave_factory or (lambda: spawn_enclave(settings)),
        on_serving=health,
    )
    if meter_provider is not None:
        host.metrics.export_to(meter_provider, queue_depth=host.queue_depth, head_lag=host.head_lag)
    servicer = StateServicer(host)
    try:
        server = build_state_server(
            config,
            servicer,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            # An Execute handler waits for its batch's commit: enough threads to fill batches.
            max_workers=max(64, 2 * settings.batch_max),
        )
    except BaseException:
        keyvault.close()
        if owned_store:
            store.close()
        raise
    server_box.append(server)
    server.on_stop.append(host.stop)
    server.on_stop.append(keyvault.close)
    if owned_store:
        server.on_stop.append(store.close)
    host.start()
    return server, server.port


def main() -> int:
    return serve("state", create_server)
