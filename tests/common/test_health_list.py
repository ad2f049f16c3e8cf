"""Health List answers on both ports of every service (grpcurl ... grpc.health.v1.Health/List)."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import tls_for
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.server import LIVENESS_SERVICE, VeilServer, build_server
from veil.services.state.server import AUTHORIZATION, SERVICE_NAME, StateServicer
from veil.state.v1 import state_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _state_server(config: ServiceConfig) -> VeilServer:
    """The state service's server with its real authorization table, and no enclave behind it."""
    return build_server(
        config,
        register=lambda s: state_pb2_grpc.add_StateServiceServicer_to_server(StateServicer(), s),
        service_names=[SERVICE_NAME],
        authorization=AUTHORIZATION,
    )


def _list(channel: grpc.Channel) -> dict[str, int]:
    response = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)  # type: ignore[attr-defined]
    return {name: status.status for name, status in response.statuses.items()}


def test_list_names_every_service_on_the_admin_and_main_ports(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = _state_server(service_config("state"))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.admin_port}") as admin:
            assert _list(admin) == {"": NOT_SERVING, SERVICE_NAME: NOT_SERVING, LIVENESS_SERVICE: SERVING}
            server.set_serving(True)
            assert _list(admin) == {"": SERVING, SERVICE_NAME: SERVING, LIVENESS_SERVICE: SERVING}
        with secure_channel(f"127.0.0.1:{server.port}", tls_for(pki_dir, "gateway")) as main:
            assert _list(main)[SERVICE_NAME] == SERVING
    finally:
        server.stop(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_grpcurl_reflection_and_health_list_leave_no_error_in_the_logs(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What an operator debugging with grpcurl does: list, describe (a reflection stream the
    client closes) and Health/List, on the admin and the mTLS port."""
    grpcurl = Path(sys.executable).with_name("grpcurl")
    server = _state_server(service_config("state"))
    server.start()
    server.set_serving(True)
    tls = ["-cacert", str(pki_dir / "ca.pem"), "-cert", str(pki_dir / "gateway.pem")]
    tls += ["-key", str(pki_dir / "gateway-key.pem"), "-servername", "state"]
    ports = [["-plaintext", f"127.0.0.1:{server.admin_port}"], [*tls, f"127.0.0.1:{server.port}"]]
    try:
        for port in ports:
            listed = subprocess.run(
                [str(grpcurl), *port, "list"], check=False, capture_output=True, text=True, timeout=30
            )
            # The admin port serves health and reflection only, and reflects only those.
            assert (SERVICE_NAME in listed.stdout) == (port is ports[1]), listed.stdout
            for args in (["describe", "grpc.health.v1.Health"], ["grpc.health.v1.Health/List"]):
                done = subprocess.run(
                    [str(grpcurl), *port, *args], check=False, capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 0, done.stderr
            assert SERVICE_NAME in done.stdout
    finally:
        server.stop(0)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_port_in_use_is_one_clear_error(service_config: Callable[[str], ServiceConfig]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on {address}: the port is in use"):
            _state_server(dataclasses.replace(service_config("state"), listen=address))
