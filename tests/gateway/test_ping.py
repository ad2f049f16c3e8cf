"""Ping, the transport baseline of `veil bench`, and the state counters in GetStatus.

Ping must take Execute's path through the gateway (instance validation, the instance's
authentication plugin, the rate limit, routing, the caller's deadline) and end at the state
replica's Ping, which touches neither the enclave nor storage.
"""

from __future__ import annotations

import hashlib
import json
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
from veil.state.v1 import state_pb2


def _counting_ping(self: EnclaveState, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
    self._count("Ping")
    self.deadlines.append(context.time_remaining())
    return state_pb2.PingResponse(payload=request.payload)


def _status_with_counters(
    self: EnclaveState, request: state_pb2.GetStatusRequest, context: grpc.ServicerContext
) -> Any:
    return state_pb2.GetStatusResponse(
        step=state_pb2.LIFECYCLE_STEP_SERVING,
        detail="serving",
        ecalls=7,
        commands=60,
        commits=3,
        holds_released_by_keyvault=2,
        holds_released_by_enclave=1,
    )


def _patched_mesh(
    monkeypatch: pytest.MonkeyPatch, pki_dir: Path, tmp_path: Path, **options: Any
) -> Iterator[InProcessMesh]:
    # Patched before the servers start: gRPC binds the servicer's methods at registration.
    monkeypatch.setattr(EnclaveState, "Ping", _counting_ping)
    monkeypatch.setattr(EnclaveState, "GetStatus", _status_with_counters)
    yield from mesh_fixture(pki_dir, tmp_path, **options)


@pytest.fixture
def mesh(monkeypatch: pytest.MonkeyPatch, pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from _patched_mesh(monkeypatch, pki_dir, tmp_path)


def _stub(mesh: InProcessMesh) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayServiceStub]:
    channel = secure_channel(mesh.address, tls_for(mesh.pki_dir, "admin"))
    return channel, gateway_pb2_grpc.GatewayServiceStub(channel)


def _refused_before_the_replica(
    mesh: InProcessMesh,
    request: gateway_pb2.PingRequest,
    code: grpc.StatusCode,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """The gateway refuses `request` with `code`, and the replica's Ping never ran."""
    channel, stub = _stub(mesh)
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.Ping(request, timeout=5, metadata=metadata)
    assert refused.value.code() == code
    assert mesh.states[0].calls["Ping"] == 0


def test_ping_reaches_the_state_replica_without_the_enclave(mesh: InProcessMesh) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
    state = mesh.states[0]
    head = state.head("coins")
    channel, stub = _stub(mesh)
    with channel:
        reply = stub.Ping(gateway_pb2.PingRequest(instance_id="coins", payload=b"x" * 300), timeout=2)
    assert reply.payload == b"x" * 300
    assert state.calls["Ping"] == 1
    assert state.calls["Execute"] == 0
    assert state.head("coins") == head
    deadline = state.deadlines[-1]
    assert deadline is not None
    # The caller's 2 s deadline travels on, as for Execute, instead of the gateway's own much
    # longer default (clocks on two hosts' sides may differ by a few milliseconds).
    assert deadline < 2.5


def test_ping_validates_the_instance_id(mesh: InProcessMesh) -> None:
    request = gateway_pb2.PingRequest(instance_id="Not An Id")
    _refused_before_the_replica(mesh, request, grpc.StatusCode.INVALID_ARGUMENT)


@pytest.fixture
def guarded_mesh(monkeypatch: pytest.MonkeyPatch, pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    auth = tmp_path / "gateway-auth.json"
    key_hash = "sha256:" + hashlib.sha256(b"letmein").hexdigest()
    policy = {
        "default": {"type": "none"},
        "instances": {"coins": {"type": "api_key", "keys": {"b": key_hash}}},
    }
    auth.write_text(json.dumps(policy))
    yield from _patched_mesh(monkeypatch, pki_dir, tmp_path, gateway_options={"auth_file": auth})


def test_ping_is_subject_to_the_instance_plugin(guarded_mesh: InProcessMesh) -> None:
    request = gateway_pb2.PingRequest(instance_id="coins")
    wrong_key = (("x-api-key", "wrong"),)
    _refused_before_the_replica(guarded_mesh, request, grpc.StatusCode.UNAUTHENTICATED, wrong_key)
    channel, stub = _stub(guarded_mesh)
    with channel:
        stub.Ping(request, timeout=5, metadata=(("x-api-key", "letmein"),))
    assert guarded_mesh.states[0].calls["Ping"] == 1


def test_a_final_newline_does_not_slip_past_the_instance_plugin(guarded_mesh: InProcessMesh) -> None:
    """ "coins\n" once matched the gateway's instance-id pattern ("$" matches before a final
    newline) and, being another key, was judged by the default plugin (none) instead of the
    key-protected instance's: it is malformed, refused before any plugin or replica."""
    request = gateway_pb2.PingRequest(instance_id="coins\n")
    _refused_before_the_replica(guarded_mesh, request, grpc.StatusCode.INVALID_ARGUMENT)


@pytest.fixture
def throttled_mesh(monkeypatch: pytest.MonkeyPatch, pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    options = {"rate_per_second": 0.5, "burst": 2}
    yield from _patched_mesh(monkeypatch, pki_dir, tmp_path, gateway_options=options)


def test_ping_is_rate_limited_like_execute(throttled_mesh: InProcessMesh) -> None:
    channel, stub = _stub(throttled_mesh)
    request = gateway_pb2.PingRequest(instance_id="coins")
    with channel:
        for _ in range(2):
            stub.Ping(request, timeout=5)
        with pytest.raises(grpc.RpcError) as limited:
            stub.Ping(request, timeout=5)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert throttled_mesh.states[0].calls["Ping"] == 2


def test_status_carries_the_state_counters(mesh: InProcessMesh) -> None:
    with mesh.connect() as admin:
        status = admin.status()
    [shard] = status.shards
    assert (shard.serving, shard.ecalls, shard.commands, shard.commits) == (True, 7, 60, 3)
    assert (shard.holds_released_by_keyvault, shard.holds_released_by_enclave) == (2, 1)
