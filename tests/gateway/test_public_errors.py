"""Internal error text does not reach anonymous callers (issue 17, item 2).

A state replica refuses with messages naming other tenants' instances and counts, the keyvault's
address, a database host and raw exception text. A caller on the public port gets the status
code, the reason and a fixed message with a correlation id; the details are in the gateway's log
under that id. A mesh certificate holder (the operator, on the mTLS port) still sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import config_on_free_ports, tls_for
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.errors import FailedPrecondition, Unavailable, VeilError, abort
from veil.services.common.server import VeilServer
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.public_errors import MESSAGES
from veil.services.gateway.server import create_server as create_gateway
from veil.services.state.server import StateServicer, build_state_server
from veil.state.v1 import state_pb2
from veil.status import error_info

SECRETS = ("tenant-b-payroll", "17 commands", "10.0.3.7", "keyvault.veil.svc:50052", "psycopg", "Traceback")
LEAKY: dict[bytes, VeilError] = {
    b"not-serving": Unavailable(
        "recovering instances tenant-b-payroll (17 commands behind), keyvault.veil.svc:50052 "
        "unreachable: psycopg.OperationalError: connection to 10.0.3.7 failed",
        reason="NOT_SERVING",
        metadata={"instance_id": "tenant-b-payroll", "db": "10.0.3.7"},
    ),
    b"head-lag": Unavailable(
        "instance tenant-b-payroll: 17 commands past the keyvault head at keyvault.veil.svc:50052",
        reason="COMMIT_HEAD_LAG",
    ),
    b"unknown-reason": FailedPrecondition("Traceback: psycopg at 10.0.3.7", reason="SOMETHING_NEW"),
}


class _LeakyState(StateServicer):
    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        error = LEAKY.get(request.payload)
        if error is None:
            return state_pb2.PingResponse(payload=request.payload)
        abort(context, error)
        raise AssertionError("unreachable")

    def ListInstances(self, request: state_pb2.ListInstancesRequest, context: grpc.ServicerContext) -> Any:
        abort(context, LEAKY[b"not-serving"])
        raise AssertionError("unreachable")


@pytest.fixture
def gateway(pki_dir: Path, tmp_path: Path) -> Iterator[VeilServer]:
    def config(service: str) -> ServiceConfig:
        return config_on_free_ports(pki_dir, service, tmp_path / service, grace_seconds=0.5)

    state = build_state_server(config("state"), _LeakyState())
    state.start()
    state.set_serving(True)
    gateway_config = GatewayConfig(
        state_addresses=(f"127.0.0.1:{state.port}",),
        keyvault_address="127.0.0.1:1",
        public_listen="127.0.0.1:0",
    )
    server, _ = create_gateway(config("gateway"), gateway=gateway_config)
    server.start()
    yield server
    server.stop(0)
    state.stop(0)


def _public(pki_dir: Path, server: VeilServer) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{server.public_port}", credentials)


@pytest.mark.parametrize("payload", sorted(LEAKY))
def test_public_callers_get_a_fixed_message_and_a_correlation_id(
    gateway: VeilServer, pki_dir: Path, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="veil.services.gateway")
    with _public(pki_dir, gateway) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).Ping(
            gateway_pb2.PingRequest(instance_id="mine", payload=payload), timeout=10
        )
    error, leaky = refused.value, LEAKY[payload]
    assert error.code() == leaky.code
    info = error_info(error)
    assert info is not None
    assert info.reason == leaky.reason  # what a client acts on is kept
    assert set(info.metadata) == {"correlation_id"}
    shown = f"{error} {error.trailing_metadata()}"
    assert not [secret for secret in SECRETS if secret in shown], shown
    assert error.details() == MESSAGES.get(leaky.reason, error.details())
    # The operator finds the details in the log under the caller's correlation id.
    logged = [r.getMessage() for r in caplog.records if info.metadata["correlation_id"] in r.getMessage()]
    assert logged
    assert any(leaky.message in line for line in logged)


def test_a_failed_directory_listing_leaks_nothing_either(gateway: VeilServer, pki_dir: Path) -> None:
    with _public(pki_dir, gateway) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).GetAttestation(
            gateway_pb2.GetAttestationRequest(instance_id="someone-else"), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    shown = f"{refused.value.details()} {refused.value.trailing_metadata()}"
    assert not [secret for secret in SECRETS if secret in shown], shown


def test_mesh_certificate_holders_still_see_the_details(gateway: VeilServer, pki_dir: Path) -> None:
    channel = secure_channel(f"127.0.0.1:{gateway.port}", tls_for(pki_dir, "admin"))
    with channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).Ping(
            gateway_pb2.PingRequest(instance_id="mine", payload=b"head-lag"), timeout=10
        )
    assert refused.value.details() == LEAKY[b"head-lag"].message
