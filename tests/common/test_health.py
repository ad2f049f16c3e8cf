"""Readiness follows the service; liveness stays SERVING while the process runs."""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health_pb2

from tests.conftest import ping_only_state_server
from veil.services.common.channels import health_status
from veil.services.common.config import ServiceConfig
from veil.services.common.server import LIVENESS_SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_liveness_is_serving_while_not_ready(service_config: Callable[[str], ServiceConfig]) -> None:
    server = ping_only_state_server(service_config("state"))
    server.set_serving(False)  # e.g. recovering, or refusing to serve with a reason
    server.start()
    try:
        admin = f"127.0.0.1:{server.admin_port}"
        assert health_status(admin) == NOT_SERVING
        assert health_status(admin, LIVENESS_SERVICE) == SERVING
        server.set_serving(True)
        assert health_status(admin) == SERVING
    finally:
        server.stop(0)
