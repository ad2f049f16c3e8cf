"""Keyvault server: attestation, key release, freshness and audit behind mTLS.

Authorization (by the caller's SPIFFE identity; a method missing here is denied):

=====================================================  ==============================
Attest, ReleaseKey, AdvanceCommitHead, AcquireLease     state
GetCommitHead                                           state; admin reads a head, never a
                                                        signed statement (`veil status`)
ListLeases                                              gateway, state, admin
GetJwks                                                 gateway, state, admin
CreateKey                                               admin, state
RotateKey, ListKeys, GetKey, DestroyKey,
ListAuditEvents                                         admin
GetStatus                                               admin, state, gateway
=====================================================  ==============================
"""

from __future__ import annotations

from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common import identity
from veil.services.common.config import ServiceConfig
from veil.services.common.main import serve
from veil.services.common.server import HostedService, VeilServer
from veil.services.keyvault.app import Keyvault, open_keyvault
from veil.services.keyvault.clock import Clock, system_clock
from veil.services.keyvault.config import KeyvaultConfig
from veil.services.keyvault.service import KeyvaultServicer

SERVICE_NAME = keyvault_pb2.DESCRIPTOR.services_by_name["KeyvaultService"].full_name

_STATE = frozenset({identity.STATE})
_ADMIN = frozenset({identity.ADMIN})
AUTHORIZATION = identity.method_names(
    SERVICE_NAME,
    {
        "Attest": _STATE,
        "ReleaseKey": _STATE,
        "GetCommitHead": frozenset({identity.STATE, identity.ADMIN}),
        "AdvanceCommitHead": _STATE,
        "AcquireLease": _STATE,
        "ListLeases": frozenset({identity.GATEWAY, identity.STATE, identity.ADMIN}),
        "GetJwks": frozenset({identity.GATEWAY, identity.STATE, identity.ADMIN}),
        "CreateKey": frozenset({identity.ADMIN, identity.STATE}),
        "RotateKey": _ADMIN,
        "ListKeys": _ADMIN,
        "GetKey": _ADMIN,
        "DestroyKey": _ADMIN,
        "ListAuditEvents": _ADMIN,
        "GetStatus": frozenset({identity.ADMIN, identity.STATE, identity.GATEWAY}),
    },
)
HOSTED_SERVICE = HostedService(
    SERVICE_NAME, AUTHORIZATION, keyvault_pb2_grpc.add_KeyvaultServiceServicer_to_server
)


def create_server(
    config: ServiceConfig,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    keyvault_config: KeyvaultConfig | None = None,
    clock: Clock = system_clock,
) -> tuple[VeilServer, int]:
    """Build the keyvault server (not started); returns it and its bound mTLS port.

    ``keyvault_config`` defaults to :meth:`KeyvaultConfig.from_env` under the service's data
    directory. The store, KEK and attestation root are opened here, so a broken
    configuration fails before the server reports SERVING; they are closed on stop.
    """
    kv_config = keyvault_config or KeyvaultConfig.from_env(config.data_dir)
    keyvault: Keyvault = open_keyvault(kv_config, clock=clock)
    try:
        servicer = KeyvaultServicer(keyvault)
        server = HOSTED_SERVICE.build_server(
            config, servicer, tracer_provider=tracer_provider, meter_provider=meter_provider
        )
    except BaseException:
        keyvault.close()
        raise
    server.on_stop.append(keyvault.close)
    server.set_serving(True)
    return server, server.port


def main() -> int:
    return serve("keyvault", create_server)
