"""A gateway the client must not trust: a proxy that tampers with what passes through it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests.conftest import tls_for
from tests.gateway.support import InProcessMesh
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.channels import secure_channel

Tamper = Callable[[Any], None]


@dataclass
class EvilGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Forwards to the real gateway, counting calls and applying tampering hooks to answers."""

    upstream: gateway_pb2_grpc.GatewayServiceStub
    calls: Counter[str] = field(default_factory=Counter)
    on_attestation: Tamper | None = None
    on_execute: Callable[[gateway_pb2.ExecuteResponse], gateway_pb2.ExecuteResponse] | None = None
    #: Replaces forwarding an Execute entirely: (request, context, upstream stub) -> answer.
    intercept_execute: Callable[[Any, grpc.ServicerContext, Any], Any] | None = None
    #: Rewrites a CreateInstance request before it is forwarded (a host choosing the config).
    on_create: Tamper | None = None

    def GetAttestation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls["GetAttestation"] += 1
        reply = self.upstream.GetAttestation(request, timeout=10)
        if self.on_attestation is not None:
            self.on_attestation(reply)
        return reply

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls["Execute"] += 1
        if self.intercept_execute is not None:
            return self.intercept_execute(request, context, self.upstream)
        reply = self.upstream.Execute(request, timeout=10)
        return self.on_execute(reply) if self.on_execute is not None else reply

    def Query(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls["Query"] += 1
        return self.upstream.Query(request, timeout=10)

    def WatchReceipts(self, request: Any, context: grpc.ServicerContext) -> Any:
        yield from self.upstream.WatchReceipts(request, timeout=10, metadata=context.invocation_metadata())

    def CreateInstance(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls["CreateInstance"] += 1
        if self.on_create is not None:
            self.on_create(request)
        return self.upstream.CreateInstance(request, timeout=30)


def evil_gateway(mesh: InProcessMesh) -> Iterator[tuple[EvilGateway, str]]:
    """Serve an EvilGateway (TLS, no client certificate) in front of `mesh`; yields it and its address."""
    channel = secure_channel(mesh.address, tls_for(mesh.pki_dir, "admin"))
    # Only the client-facing calls are proxied; the rest answer UNIMPLEMENTED.
    servicer = EvilGateway(gateway_pb2_grpc.GatewayServiceStub(channel))  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    pki = mesh.pki_dir
    credentials = grpc.ssl_server_credentials(
        [((pki / "gateway-key.pem").read_bytes(), (pki / "gateway.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)
    channel.close()
