"""Gateway server: Veil's public gRPC API in front of the state shards."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.state.v1 import state_pb2, state_pb2_grpc

from services.common import identity
from services.common.channels import call, remaining_timeout, secure_channel
from services.common.config import ServiceConfig
from services.common.main import serve
from services.common.server import VeilServer, build_server
from services.gateway.config import GatewayConfig

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
_ANYONE = frozenset({identity.ADMIN, identity.GATEWAY, identity.STATE, identity.KEYVAULT})

AUTHORIZATION = identity.method_names(SERVICE_NAME, {"GetStatus": _ANYONE})


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API (command routing arrives with the gateway issue)."""

    def __init__(self, shards: dict[str, state_pb2_grpc.StateServiceStub]):
        self._shards = shards

    def GetStatus(self, request: gateway_pb2.GetStatusRequest, context: grpc.ServicerContext) -> Any:
        statuses = []
        for address, stub in self._shards.items():
            try:
                reply = call(
                    stub.GetStatus, state_pb2.GetStatusRequest(), timeout=remaining_timeout(context, 5.0)
                )
                serving = reply.step == state_pb2.LIFECYCLE_STEP_SERVING
            except grpc.RpcError:
                serving = False
            statuses.append(gateway_pb2.ShardStatus(address=address, serving=serving))
        all_serving = all(s.serving for s in statuses)
        detail = "all shards serving" if all_serving else "some shards are not serving"
        return gateway_pb2.GetStatusResponse(serving=all_serving, detail=detail, shards=statuses)


def create_server(
    config: ServiceConfig,
    *,
    gateway: GatewayConfig | None = None,
    tracer_provider: TracerProvider | None = None,
) -> tuple[VeilServer, int]:
    """Build the gateway server (not started); returns it and its bound port."""
    gateway = gateway or GatewayConfig.from_env()
    channels = {
        address: secure_channel(address, config.tls, tracer_provider) for address in gateway.state_addresses
    }
    servicer = GatewayServicer(  # type: ignore[abstract]  # other RPCs: UNIMPLEMENTED until issue 6
        {a: state_pb2_grpc.StateServiceStub(c) for a, c in channels.items()}
    )
    server = build_server(
        config,
        register=lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        authorization=AUTHORIZATION,
        tracer_provider=tracer_provider,
    )
    server.on_stop.extend(channel.close for channel in channels.values())
    server.set_serving(True)
    return server, server.port


def main() -> int:
    return serve("gateway", create_server)
