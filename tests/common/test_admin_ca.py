"""The admin identity comes from its own CA (issue 17, item 4's separate admin CA).

The CA that issues service identities (cert-manager's in a cluster; anyone with rights on its
namespace can have it sign) must not be able to make `spiffe://veil/admin`, and the admin CA
must not make services. Each attack presents such a certificate to real servers over mTLS.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ping_only_state_server, refused, tls_for
from veil.dev.pki import ADMIN_CA_FILE, Issued, ca_key_dir, ensure_admin_ca, init_pki, service_certificate
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.config import ServiceConfig
from veil.services.common.identity import ADMIN, GATEWAY
from veil.services.common.server import VeilServer
from veil.services.keyvault.server import create_server as create_keyvault
from veil.state.v1 import state_pb2, state_pb2_grpc

from ..keyvault.support import sim_keyvault_config


def _ca(pki_dir: Path, cert: str, key: str) -> Issued:
    certificate = x509.load_pem_x509_certificate((pki_dir / cert).read_bytes())
    private = serialization.load_pem_private_key((ca_key_dir(pki_dir) / key).read_bytes(), None)
    return Issued(certificate, private)  # type: ignore[arg-type]  # the dev CAs' keys are EC


def _credentials(pki_dir: Path, leaf: Issued) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.pem").read_bytes(),
        private_key=leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        certificate_chain=leaf.cert.public_bytes(serialization.Encoding.PEM),
    )


def _minted(pki_dir: Path, by: str, identity: str) -> grpc.ChannelCredentials:
    """A leaf for `identity` from the service CA (`by="service"`) or the admin CA."""
    ca = (
        _ca(pki_dir, "ca.pem", "ca-key.pem")
        if by == "service"
        else _ca(pki_dir, ADMIN_CA_FILE, "admin-ca-key.pem")
    )
    return _credentials(pki_dir, service_certificate(ca, identity, dt.datetime.now(dt.UTC)))


def _genuine_admin(pki_dir: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.pem").read_bytes(),
        private_key=(pki_dir / "admin-key.pem").read_bytes(),
        certificate_chain=(pki_dir / "admin.pem").read_bytes(),
    )


@pytest.fixture
def keyvault(service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path) -> Iterator[int]:
    config = sim_keyvault_config(tmp_path / "kv", pki_dir, tmp_path)
    server, port = create_keyvault(service_config("keyvault"), keyvault_config=config)
    server.start()
    yield port
    server.stop(0)


def _list_keys(port: int, credentials: grpc.ChannelCredentials) -> keyvault_pb2.ListKeysResponse:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        reply: keyvault_pb2.ListKeysResponse = keyvault_pb2_grpc.KeyvaultServiceStub(channel).ListKeys(
            keyvault_pb2.ListKeysRequest(), timeout=10
        )
        return reply


def test_the_genuine_admin_manages_keys(keyvault: int, pki_dir: Path) -> None:
    assert list(_list_keys(keyvault, _genuine_admin(pki_dir)).keys) == []


def test_an_admin_certificate_from_the_service_ca_is_refused(keyvault: int, pki_dir: Path) -> None:
    forged = _minted(pki_dir, "service", ADMIN)  # what the in-cluster CA could be asked to sign
    assert refused(lambda: _list_keys(keyvault, forged)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "ADMIN_CA_REQUIRED",
    )


def test_a_service_identity_from_the_admin_ca_is_refused(pki_dir: Path, state_server: VeilServer) -> None:
    forged = _minted(pki_dir, "admin", GATEWAY)  # the one identity the state's Ping admits
    with grpc.secure_channel(f"127.0.0.1:{state_server.port}", forged) as channel:
        stub = state_pb2_grpc.StateServiceStub(channel)
        refusal = refused(lambda: stub.Ping(state_pb2.PingRequest(payload=b"x"), timeout=10))
    assert refusal == (grpc.StatusCode.UNAUTHENTICATED, "NOT_ADMIN_IDENTITY")


def test_the_forged_admin_is_refused_even_a_health_check(pki_dir: Path, state_server: VeilServer) -> None:
    forged = _minted(pki_dir, "service", ADMIN)
    with grpc.secure_channel(f"127.0.0.1:{state_server.port}", forged) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        refusal = refused(
            lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # type: ignore[attr-defined]
        )
    assert refusal == (grpc.StatusCode.UNAUTHENTICATED, "ADMIN_CA_REQUIRED")


def test_a_server_without_an_admin_ca_accepts_no_admin(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path
) -> None:
    config = service_config("state")
    server = ping_only_state_server(replace(config, tls=replace(config.tls, admin_ca=None)))
    server.start()
    try:
        with grpc.secure_channel(f"127.0.0.1:{server.port}", _minted(pki_dir, "admin", ADMIN)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            refusal = refused(
                lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # type: ignore[attr-defined]
            )
    finally:
        server.stop(0)
    # The admin CA is not even in the server's trust bundle: the handshake fails.
    assert refusal[0] == grpc.StatusCode.UNAVAILABLE


def test_services_default_to_the_dev_admin_ca_or_the_variable(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki")
    default = ServiceConfig.from_env("state", {"VEIL_STATE_DATA_DIR": str(tmp_path)})
    assert default.tls.admin_ca == tmp_path / "pki" / ADMIN_CA_FILE
    named = ServiceConfig.from_env(
        "state", {"VEIL_STATE_DATA_DIR": str(tmp_path), "VEIL_STATE_ADMIN_CA": "/etc/veil/admin-ca/ca.crt"}
    )
    assert named.tls.admin_ca == Path("/etc/veil/admin-ca/ca.crt")


def test_an_older_dev_pki_gets_an_admin_ca_and_a_new_admin_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki)
    (pki / ADMIN_CA_FILE).unlink()  # the layout before the admin CA
    old_admin = (pki / "admin.pem").read_bytes()
    assert ensure_admin_ca(pki)
    admin = x509.load_pem_x509_certificate((pki / "admin.pem").read_bytes())
    admin.verify_directly_issued_by(x509.load_pem_x509_certificate((pki / ADMIN_CA_FILE).read_bytes()))
    assert (pki / "admin.pem").read_bytes() != old_admin
    assert ensure_admin_ca(pki) == []  # once
    assert tls_for(pki, "admin").admin_ca == pki / ADMIN_CA_FILE
