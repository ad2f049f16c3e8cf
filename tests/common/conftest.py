"""Fixtures for the transport tests: a started state server that answers Ping and GetStatus only."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import ping_only_state_server
from veil.services.common.config import ServiceConfig
from veil.services.common.server import VeilServer


@pytest.fixture
def state_server(service_config: Callable[[str], ServiceConfig]) -> Iterator[VeilServer]:
    server = ping_only_state_server(service_config("state"))
    server.start()
    yield server
    server.stop(0)
