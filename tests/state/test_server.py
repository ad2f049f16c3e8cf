"""The StateService over mTLS gRPC, called as the gateway, with a real keyvault and enclave."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import tls_for
from tests.state.support import Node
from veil.dev.loadclient import Account, mint, token_config, total_supply, vault_config, vault_put
from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.services.common.channels import secure_channel
from veil.services.common.config import ConfigError, ServiceConfig
from veil.services.state import lifecycle
from veil.services.state.config import StateConfig
from veil.services.state.runner import in_process_enclave
from veil.services.state.server import create_server
from veil.state.v1 import state_pb2, state_pb2_grpc
from veil.status import error_info
from veil.verify.quote import parse_quote

SERVING = health_pb2.HealthCheckResponse.SERVING


class Running:
    """A started state server and channels to it."""

    def __init__(self, node: Node, **overrides: object) -> None:
        settings = node.config("a", **overrides)
        self.server, self.port = create_server(
            node.base, state_config=settings, enclave_factory=lambda: in_process_enclave(settings)
        )
        self.server.start()
        self.pki_dir = node.pki_dir
        self.channels: list[grpc.Channel] = []

    def stub(self, identity: str = "gateway") -> state_pb2_grpc.StateServiceStub:
        channel = secure_channel(f"127.0.0.1:{self.port}", tls_for(self.pki_dir, identity))
        self.channels.append(channel)
        return state_pb2_grpc.StateServiceStub(channel)

    def health(self) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.server.admin_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)  # type: ignore[attr-defined]

    def wait_serving(self) -> None:
        for _ in range(300):
            if self.health() == SERVING:
                return
            time.sleep(0.05)
        raise AssertionError("the state server never reported SERVING")

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        self.server.stop(1)


@pytest.fixture
def running(node: Node) -> Iterator[Running]:
    server = Running(node)
    yield server
    server.stop()


def test_health_follows_recovery_and_status_says_why(node: Node) -> None:
    node.keyvault.stop()
    server = Running(node)
    try:
        stub = server.stub()
        for _ in range(200):
            status = stub.GetStatus(state_pb2.GetStatusRequest(), timeout=5)
            if "retry" in status.detail:
                break
            time.sleep(0.05)
        assert status.step == lifecycle.ATTESTING
        assert "unreachable" in status.detail
        assert server.health() != SERVING
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListInstances(state_pb2.ListInstancesRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        node.keyvault.start()
        server.wait_serving()
        assert stub.GetStatus(state_pb2.GetStatusRequest(), timeout=5).step == lifecycle.SERVING
    finally:
        server.stop()


def test_the_gateway_runs_commands_and_verifies_the_attestation(running: Running) -> None:
    running.wait_serving()
    stub = running.stub()
    bundle = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle
    # The quote binds the keys and the nonce; the token is signed by the keyvault's JWKS.
    report_data = parse_quote(bundle.quote).report_body.report_data
    assert report_data == wire.report_data(bundle.runtime_data, bundle.nonce)
    assert envelope_pb2.EnclavePublicKeys.FromString(bundle.runtime_data) == bundle.keys
    header = jwt.get_unverified_header(bundle.attestation_token)
    key = jwt.PyJWKSet.from_json(bundle.jwks_json)[header["kid"]]
    claims = jwt.decode(bundle.attestation_token, key, algorithms=["ES256"], options={"verify_aud": False})
    ehd = base64.urlsafe_b64decode(claims["x-ms-sgx-ehd"] + "=" * (-len(claims["x-ms-sgx-ehd"]) % 4))
    assert ehd == bundle.runtime_data

    issuer_key = ed25519.Ed25519PrivateKey.generate()
    created = stub.CreateInstance(
        state_pb2.CreateInstanceRequest(
            instance_id="tokens", config=token_config(issuer_key), request_id="c1"
        ),
        timeout=10,
    )
    assert created.instance.head.sequence == 1
    issuer = Account(bundle.keys, "tokens", signer=issuer_key)
    sealed = issuer.seal(mint("someone", 5))
    response = stub.Execute(
        state_pb2.ExecuteRequest(instance_id="tokens", command=sealed.command, request_id=sealed.request_id),
        timeout=10,
    )
    assert issuer.open(sealed, response.outcome).result.token.mint.amount == 5
    query = issuer.seal(total_supply(), counter=0)
    answer = stub.Query(state_pb2.QueryRequest(instance_id="tokens", command=query.command), timeout=5)
    assert issuer.open(query, answer.outcome).result.token.total_supply.amount == 5
    listed = stub.ListInstances(state_pb2.ListInstancesRequest(), timeout=5).instances
    assert [(i.instance_id, i.head.sequence) for i in listed] == [("tokens", 2)]
    status = stub.GetStatus(state_pb2.GetStatusRequest(), timeout=5)
    assert (status.step, status.commands, status.commits) == (lifecycle.SERVING, 1, 1)
    assert stub.Ping(state_pb2.PingRequest(payload=b"hi"), timeout=5).payload == b"hi"


@pytest.mark.parametrize("identity", ["admin", "state", "keyvault"])
def test_only_the_gateway_may_call(running: Running, identity: str) -> None:
    stub = running.stub(identity)
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetStatus(state_pb2.GetStatusRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_memory_budget_refusal_reaches_the_gateway_unchanged(node: Node) -> None:
    server = Running(node, enclave_memory_mb=1)
    try:
        server.wait_serving()
        stub = server.stub()
        keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle.keys
        stub.CreateInstance(
            state_pb2.CreateInstanceRequest(instance_id="vault", config=vault_config(), request_id="c"),
            timeout=10,
        )
        account = Account(keys, "vault", name="big")
        code = grpc.StatusCode.OK
        for i in range(6):
            sealed = account.seal(vault_put(f"r{i}", bytes(300 * 1024)))
            try:
                stub.Execute(
                    state_pb2.ExecuteRequest(
                        instance_id="vault", command=sealed.command, request_id=sealed.request_id
                    ),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                code = exc.code()
                info = error_info(exc)
                break
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info is not None
        assert info.reason == "RESOURCE_EXHAUSTED"
    finally:
        server.stop()


def test_bad_requests_are_invalid_arguments(running: Running) -> None:
    running.wait_serving()
    stub = running.stub()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Execute(state_pb2.ExecuteRequest(instance_id="x"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateInstance(state_pb2.CreateInstanceRequest(instance_id="x"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_enclave_mode_has_no_default(tmp_path: Path) -> None:
    base = ServiceConfig(
        "state", "127.0.0.1:0", "127.0.0.1:0", tls_for(tmp_path, "state"), data_dir=tmp_path / "data"
    )
    with pytest.raises(ConfigError, match="VEIL_STATE_ENCLAVE_MODE"):
        StateConfig.from_env(base, {})
    config = StateConfig.from_env(base, {"VEIL_STATE_ENCLAVE_MODE": "sim"})
    assert config.database == str(tmp_path / "data" / "state.db")
    assert config.seal_dir == tmp_path / "data" / "sealed"
    assert config.platform_secret == tmp_path / "data" / "sim-platform.key"
    assert config.pck_dir == tmp_path / "data" / "pki"
    assert (config.snapshot_every, config.batch_max, config.batch_linger_ms) == (1000, 256, 20.0)
    custom = StateConfig.from_env(
        base,
        {
            "VEIL_STATE_ENCLAVE_MODE": "gramine",
            "VEIL_STATE_DB": "postgresql://db/state",
            "VEIL_STATE_SNAPSHOT_EVERY": "0",
            "VEIL_STATE_BATCH_MAX": "64",
            "VEIL_STATE_ENCLAVE_MEMORY_MB": "128",
        },
    )
    assert (custom.database, custom.snapshot_every, custom.batch_max) == ("postgresql://db/state", 0, 64)
    assert custom.enclave_memory_mb == 128
    with pytest.raises(ConfigError, match="VEIL_STATE_BATCH_MAX"):
        StateConfig.from_env(base, {"VEIL_STATE_ENCLAVE_MODE": "sim", "VEIL_STATE_BATCH_MAX": "0"})
    with pytest.raises(ConfigError, match="VEIL_STATE_SNAPSHOT_EVERY"):
        StateConfig.from_env(base, {"VEIL_STATE_ENCLAVE_MODE": "sim", "VEIL_STATE_SNAPSHOT_EVERY": "often"})
