"""Fixtures shared by every test: a dev PKI and service configs bound to port 0."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from veil.dev.pki import init_pki
from veil.services.common.config import ServiceConfig, TlsFiles
from veil.services.common.server import VeilServer
from veil.services.state.server import StateServicer, build_state_server
from veil.status import error_info

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI (CA, service and admin certs, sim PCK chain) shared by the session."""
    directory = tmp_path_factory.mktemp("data") / "pki"
    init_pki(directory, now=dt.datetime.now(dt.UTC))
    return directory


def tls_for(pki_dir: Path, name: str) -> TlsFiles:
    """The mTLS files of `name` (a service or "admin") in the dev PKI."""
    return TlsFiles(
        cert=pki_dir / f"{name}.pem",
        key=pki_dir / f"{name}-key.pem",
        ca=pki_dir / "ca.pem",
        admin_ca=pki_dir / "admin-ca.pem",  # what a server accepts spiffe://veil/admin from
    )


def config_on_free_ports(
    pki_dir: Path, service: str, data_dir: Path, grace_seconds: float = 2.0
) -> ServiceConfig:
    """The config of `service` listening on free ports (port 0) with the dev PKI."""
    return ServiceConfig(
        service=service,
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        tls=tls_for(pki_dir, service),
        data_dir=data_dir,
        grace_seconds=grace_seconds,
    )


@pytest.fixture
def service_config(pki_dir: Path, tmp_path: Path) -> Callable[[str], ServiceConfig]:
    """Build the config of a service listening on free ports (port 0) with the dev PKI."""
    return lambda service: config_on_free_ports(pki_dir, service, tmp_path / service)


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason ("" without one) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    info = error_info(raised.value)
    return raised.value.code(), info.reason if info is not None else ""


def ping_only_state_server(
    config: ServiceConfig, tracer_provider: TracerProvider | None = None
) -> VeilServer:
    """A state server without an enclave host: it answers Ping and GetStatus only.

    Transport-level tests (mTLS, authorization, tracing, errors) need the real server
    factory and authorization table, not the enclave start-up.
    """
    servicer = StateServicer()
    server = build_state_server(config, servicer, tracer_provider=tracer_provider)
    server.set_serving(True)
    return server
