"""Keyvault server: attestation, key release, freshness and audit behind mTLS."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc

from services.common import identity
from services.common.config import ServiceConfig
from services.common.main import serve
from services.common.server import VeilServer, build_server

SERVICE_NAME = keyvault_pb2.DESCRIPTOR.services_by_name["KeyvaultService"].full_name

AUTHORIZATION = identity.method_names(
    SERVICE_NAME,
    {"GetStatus": frozenset({identity.ADMIN, identity.STATE, identity.GATEWAY})},
)


class KeyvaultServicer(keyvault_pb2_grpc.KeyvaultServiceServicer):
    """Keyvault RPCs (the key and attestation RPCs arrive with the keyvault issue)."""

    def GetStatus(self, request: keyvault_pb2.GetStatusRequest, context: grpc.ServicerContext) -> Any:
        return keyvault_pb2.GetStatusResponse(serving=True, detail="serving", kek_provider="file")


def create_server(
    config: ServiceConfig, *, tracer_provider: TracerProvider | None = None
) -> tuple[VeilServer, int]:
    """Build the keyvault server (not started); returns it and its bound port."""
    servicer = KeyvaultServicer()  # type: ignore[abstract]  # other RPCs: UNIMPLEMENTED until issue 4
    server = build_server(
        config,
        register=lambda s: keyvault_pb2_grpc.add_KeyvaultServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        authorization=AUTHORIZATION,
        tracer_provider=tracer_provider,
    )
    server.set_serving(True)
    return server, server.port


def main() -> int:
    return serve("keyvault", create_server)
