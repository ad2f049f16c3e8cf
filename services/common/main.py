"""The entry point shared by the three services (`python -m veil.services.<name>`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

from veil.services.common.config import ConfigError, ServiceConfig
from veil.services.common.logs import configure_logging
from veil.services.common.server import VeilServer, run_until_signalled
from veil.services.common.telemetry import Telemetry, TelemetryConfig

_log = logging.getLogger(__name__)

ServerFactory = Callable[..., tuple[VeilServer, int]]


def serve(service: str, create_server: ServerFactory) -> int:
    """Configure logs and telemetry, build the server from the environment, serve until signalled.

    Tracing and metrics exist only when an exporter is configured (`TelemetryConfig`): without
    one the factory gets no providers and installs no tracing interceptors."""
    config = ServiceConfig.from_env(service)
    configure_logging(service, config.log_level)
    try:
        telemetry = Telemetry.build(service, TelemetryConfig.from_env())
    except ConfigError as exc:
        _log.error("%s cannot start: %s", service, exc)
        return 1
    telemetry.install_globally()
    # What the imports built (modules, classes, functions: 48,000-65,000 objects) lives as long
    # as the process: out of every full collection, which then walks only what serving allocates
    # (the gateway's full collections paused it 20-40 ms under load with them in). Frozen before
    # the server is built: the state service starts its first incarnation in there, and a frozen
    # cycle (an incarnation refers to itself) would never be freed once recovery retires it.
    gc.freeze()
    try:
        server, port = create_server(
            config, tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
        )
    except OSError as exc:  # one line, not a traceback: the usual cause is a port in use
        _log.error("%s cannot start: %s", service, exc)
        return 1
    server.start()
    _log.info("%s listening on %s (mTLS) and %s (admin)", service, port, server.admin_port)
    run_until_signalled(server, config.grace_seconds)
    telemetry.shutdown()
    return 0
