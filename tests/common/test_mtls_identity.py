"""mTLS and per-method authorization: who gets in, and who may call what."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from tests.conftest import tls_for
from veil.dev.pki import init_pki
from veil.services.common.config import TlsFiles
from veil.services.common.server import VeilServer
from veil.services.common.tls import channel_credentials
from veil.state.v1 import state_pb2, state_pb2_grpc
from veil.status import error_info


def _ping(port: int, credentials: grpc.ChannelCredentials) -> state_pb2.PingResponse:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = state_pb2_grpc.StateServiceStub(channel)
        reply: state_pb2.PingResponse = stub.Ping(state_pb2.PingRequest(payload=b"hi"), timeout=5)
        return reply


def test_gateway_identity_is_allowed(state_server: VeilServer, pki_dir: Path) -> None:
    assert _ping(state_server.port, channel_credentials(tls_for(pki_dir, "gateway"))).payload == b"hi"


@pytest.mark.parametrize("caller", ["admin", "keyvault", "state"])
def test_other_identities_get_permission_denied(state_server: VeilServer, pki_dir: Path, caller: str) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        _ping(state_server.port, channel_credentials(tls_for(pki_dir, caller)))
    assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(excinfo.value)
    assert info is not None
    assert info.reason == "PERMISSION_DENIED"
    assert info.metadata["caller"] == f"spiffe://veil/{caller}"


def test_no_client_certificate_never_gets_in(state_server: VeilServer, pki_dir: Path) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as excinfo:
        _ping(state_server.port, credentials)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_certificate_from_another_ca_is_rejected(
    state_server: VeilServer, pki_dir: Path, tmp_path: Path
) -> None:
    rogue = tmp_path / "rogue"
    init_pki(rogue, now=dt.datetime.now(dt.UTC))
    # The rogue gateway cert carries the right SPIFFE ID but chains to another CA.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.pem").read_bytes(),
        private_key=(rogue / "gateway-key.pem").read_bytes(),
        certificate_chain=(rogue / "gateway.pem").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        _ping(state_server.port, credentials)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_and_reflection_open_to_any_authenticated_peer(
    state_server: VeilServer, pki_dir: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = TlsFiles(pki_dir / "admin.pem", pki_dir / "admin-key.pem", pki_dir / "ca.pem")
    with grpc.secure_channel(f"127.0.0.1:{state_server.port}", channel_credentials(tls)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # stub sets methods in __init__
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_port_serves_plaintext_health_only(state_server: VeilServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{state_server.admin_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # stub sets methods in __init__
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as excinfo:
            state_pb2_grpc.StateServiceStub(channel).Ping(state_pb2.PingRequest(), timeout=5)
    assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED
