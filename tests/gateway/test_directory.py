"""A restarted gateway knows no instance yet: concurrent first lookups must all find it.

The gateway refreshes its instance directory at most once a second (a flood of lookups for
unknown instances must not become a flood of fan-outs). A lookup that arrived while that one
refresh was still in flight used to answer NOT_FOUND for an instance that exists; found by the
chaos run (clients re-attesting together after a state restart, behind a restarted gateway).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import tls_for
from tests.gateway.support import EnclaveState, InProcessMesh, mesh_fixture, token_config
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.sdk.identity import new_identity
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.server import create_server as create_gateway
from veil.state.v1 import state_pb2

_slow_listing = EnclaveState.ListInstances


def _slow_list_instances(
    self: EnclaveState, request: state_pb2.ListInstancesRequest, context: grpc.ServicerContext
) -> Any:
    time.sleep(0.3)  # keeps the first refresh in flight while the other lookups arrive
    return _slow_listing(self, request, context)


@pytest.fixture
def mesh(monkeypatch: pytest.MonkeyPatch, pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    monkeypatch.setattr(EnclaveState, "ListInstances", _slow_list_instances)
    yield from mesh_fixture(pki_dir, tmp_path)


def test_concurrent_first_lookups_on_a_fresh_gateway_find_the_instance(
    mesh: InProcessMesh, tmp_path: Path
) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
    config = ServiceConfig(
        service="gateway",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        tls=tls_for(mesh.pki_dir, "gateway"),
        data_dir=tmp_path / "fresh-gateway",
        grace_seconds=0.5,
    )
    fresh, port = create_gateway(
        config, gateway=GatewayConfig(tuple(mesh.state_addresses), "127.0.0.1:1", public_listen="")
    )
    fresh.start()
    codes: list[grpc.StatusCode] = []

    def attest() -> None:
        try:
            stub.GetAttestation(gateway_pb2.GetAttestationRequest(instance_id="coins"), timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())

    try:
        with secure_channel(f"127.0.0.1:{port}", tls_for(mesh.pki_dir, "admin")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            threads = [threading.Thread(target=attest) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        fresh.stop(0)
    assert codes == [grpc.StatusCode.OK] * 8
    assert mesh.states[0].calls["ListInstances"] == 1  # still one fan-out for all of them
