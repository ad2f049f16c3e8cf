"""The entry point shared by the three services (`python -m veil.services.<name>`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from veil.services.common.config import ServiceConfig
from veil.services.common.logs import configure_logging
from veil.services.common.server import VeilServer, run_until_signalled
from veil.services.common.tracing import install_global_provider, make_tracer_provider

_log = logging.getLogger(__name__)

ServerFactory = Callable[..., tuple[VeilServer, int]]


def serve(service: str, create_server: ServerFactory) -> int:
    """Configure logs and tracing, build the server from the environment, serve until signalled."""
    config = ServiceConfig.from_env(service)
    configure_logging(service, config.log_level)
    provider = make_tracer_provider(service)
    install_global_provider(provider)
    try:
        server, port = create_server(config, tracer_provider=provider)
    except OSError as exc:  # one line, not a traceback: the usual cause is a port in use
        _log.error("%s cannot start: %s", service, exc)
        return 1
    server.start()
    _log.info("%s listening on %s (mTLS) and %s (admin)", service, port, server.admin_port)
    run_until_signalled(server, config.grace_seconds)
    return 0
