"""State service server: hosts the enclave; only the gateway identity may call it."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from veil.state.v1 import state_pb2, state_pb2_grpc

from services.common import identity
from services.common.config import ServiceConfig
from services.common.main import serve
from services.common.server import VeilServer, build_server

SERVICE_NAME = state_pb2.DESCRIPTOR.services_by_name["StateService"].full_name

# Every state RPC is for the gateway alone: clients reach enclaves only through it.
AUTHORIZATION = identity.method_names(
    SERVICE_NAME,
    {
        name: frozenset({identity.GATEWAY})
        for name in state_pb2.DESCRIPTOR.services_by_name["StateService"].methods_by_name
    },
)


class StateServicer(state_pb2_grpc.StateServiceServicer):
    """The state host's RPCs (enclave-backed calls arrive with the state-service issue)."""

    def __init__(self) -> None:
        self.step = state_pb2.LIFECYCLE_STEP_SERVING

    def GetStatus(self, request: state_pb2.GetStatusRequest, context: grpc.ServicerContext) -> Any:
        return state_pb2.GetStatusResponse(step=self.step, detail="serving")

    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        # The transport baseline: acknowledged by the host, no enclave, no storage.
        return state_pb2.PingResponse(payload=request.payload)


def create_server(
    config: ServiceConfig, *, tracer_provider: TracerProvider | None = None
) -> tuple[VeilServer, int]:
    """Build the state server (not started); returns it and its bound mTLS port."""
    servicer = StateServicer()  # type: ignore[abstract]  # other RPCs: UNIMPLEMENTED until issue 5
    server = build_server(
        config,
        register=lambda s: state_pb2_grpc.add_StateServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        authorization=AUTHORIZATION,
        tracer_provider=tracer_provider,
    )
    server.set_serving(True)
    return server, server.port


def main() -> int:
    return serve("state", create_server)
