"""The gateway in process: real gateway server, enclave-backed state replicas, real TLS.

Every refused request (oversize, malformed, wrong instance, unauthenticated, rate limited)
must get its status and must not change anything: the state replica never sees it and the
enclave's head does not move.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import tls_for
from tests.gateway.support import (
    FailedCall,
    InProcessMesh,
    TokenAuthority,
    mesh_fixture,
    start_mesh,
    token_config,
)
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.sdk.client import VeilClient
from veil.sdk.errors import GatewayError
from veil.sdk.identity import SigningIdentity, new_identity
from veil.sdk.sealing import SealedRequest, open_outcome, seal_command
from veil.services.common import identity as ids
from veil.services.common.channels import secure_channel
from veil.services.common.server import build_server
from veil.services.gateway.upstream import translate
from veil.status import error_info

Stub = gateway_pb2_grpc.GatewayServiceStub
# Accounts of a signature instance are Ed25519 keys (the SDK refuses anything else).
BOB, CAROL = "b0" * 32, "c0" * 32


def _stub(mesh: InProcessMesh, who: str = "admin") -> tuple[grpc.Channel, Stub]:
    channel = secure_channel(mesh.address, tls_for(mesh.pki_dir, who))
    return channel, gateway_pb2_grpc.GatewayServiceStub(channel)


def _public(mesh: InProcessMesh) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=(mesh.pki_dir / "ca.pem").read_bytes())
    return grpc.secure_channel(mesh.public_address, credentials)


def _seal(
    client: VeilClient,
    instance: str,
    who: SigningIdentity,
    to: str = "bob",
    amount: int = 1,
    counter: int = 0,
) -> SealedRequest:
    attestation = client.attest(instance)
    call = apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=to, amount=amount)))
    return seal_command(
        attestation.keys,
        instance_id=instance,
        scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        identity=who,
        call=call,
        counter=counter or client.counters.last(instance, who.account) + 1,
        request_id=client.new_request_id(),
    )


def _execute_request(sealed: SealedRequest) -> gateway_pb2.ExecuteRequest:
    return gateway_pb2.ExecuteRequest(
        instance_id=sealed.instance_id, command=sealed.command, request_id=sealed.request_id
    )


def _code(error: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    info = error_info(error.value)
    return error.value.code(), info.reason if info else ""


def test_commands_flow_through_the_gateway(admin: VeilClient, coins: str, alice: SigningIdentity) -> None:
    token = admin.token(coins, alice)
    assert token.transfer(BOB, 250) == 750
    assert token.balance() == 750
    assert token.last is not None
    assert token.last.receipt is not None
    assert token.last.receipt.kind == envelope_pb2.RECEIPT_KIND_QUERY


def test_public_port_serves_clients_without_a_certificate(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    with mesh.connect(admin=False) as anonymous:
        assert anonymous.token(coins, alice).transfer(CAROL, 5) == 995
        with pytest.raises(GatewayError) as refused:
            anonymous.create_instance("mine", token_config(alice.public_key))
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(GatewayError) as listing:
            anonymous.list_instances()
        assert listing.value.code == grpc.StatusCode.UNAUTHENTICATED
    with _public(mesh) as channel, pytest.raises(grpc.RpcError) as health:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[attr-defined]
    assert health.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_gateway_passes_on_only_the_states_evidence(mesh: InProcessMesh, coins: str) -> None:
    """The state host answers with the public message itself; what only the gateway may fill
    (placement) or only the named descriptor field carries is never taken from the bundle."""
    state = mesh.states[0]
    genuine = gateway_pb2.GetAttestationResponse()
    genuine.CopyFrom(state.bundle)
    state.bundle.instance.CopyFrom(gateway_pb2.Instance(instance_id=coins, shard="evil:1"))
    state.bundle.descriptor.instance_id = "forged"
    try:
        channel, stub = _stub(mesh)
        with channel:
            default = stub.GetAttestation(gateway_pb2.GetAttestationRequest(), timeout=5)
            named = stub.GetAttestation(gateway_pb2.GetAttestationRequest(instance_id=coins), timeout=5)
    finally:
        state.bundle.CopyFrom(genuine)
    assert not default.HasField("instance")
    assert not default.HasField("descriptor")
    assert default.quote == genuine.quote
    assert default.jwks_json  # the keyvault's, when the state sends none
    assert named.instance.shard != "evil:1"
    assert named.descriptor.instance_id == coins  # the descriptor the enclave signed


def test_only_the_admin_identity_creates_instances(mesh: InProcessMesh, alice: SigningIdentity) -> None:
    channel, stub = _stub(mesh, "state")
    with channel, pytest.raises(grpc.RpcError) as denied:
        stub.CreateInstance(
            gateway_pb2.CreateInstanceRequest(
                instance_id="x", config=token_config(alice.public_key), request_id="r-1"
            ),
            timeout=5,
        )
    assert _code(denied) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert mesh.states[0].calls["CreateInstance"] == 0


@pytest.fixture
def small_mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"max_message_bytes": 4096})


def test_oversize_request_is_resource_exhausted_and_changes_nothing(small_mesh: InProcessMesh) -> None:
    alice = new_identity(small_mesh.data_dir, "alice")
    with small_mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        head = small_mesh.states[0].head("coins")
        sealed = _seal(admin, "coins", alice)
        request = _execute_request(sealed)
        request.command.ciphertext += bytes(8192)
        channel, stub = _stub(small_mesh)
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.Execute(request, timeout=5)
    assert _code(refused) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    assert small_mesh.states[0].calls["Execute"] == 0
    assert small_mesh.states[0].head("coins") == head


def _mutations() -> list[tuple[str, Any]]:
    def instance(r: gateway_pb2.ExecuteRequest) -> None:
        r.instance_id = "Not_An_Id!"

    def instance_with_a_final_newline(r: gateway_pb2.ExecuteRequest) -> None:
        r.instance_id += "\n"

    def suite(r: gateway_pb2.ExecuteRequest) -> None:
        r.command.suite = envelope_pb2.HPKE_SUITE_UNSPECIFIED

    def enc(r: gateway_pb2.ExecuteRequest) -> None:
        r.command.encapsulated_key = r.command.encapsulated_key[:-1]

    def ciphertext(r: gateway_pb2.ExecuteRequest) -> None:
        r.command.ciphertext = b"x"

    def request_id(r: gateway_pb2.ExecuteRequest) -> None:
        r.request_id = ""

    def long_request_id(r: gateway_pb2.ExecuteRequest) -> None:
        r.request_id = "r" * 65

    def request_id_over_64_bytes(r: gateway_pb2.ExecuteRequest) -> None:
        r.request_id = "\u00e9" * 33  # 33 characters, 66 bytes: over the enclave's limit

    return [
        (f.__name__, f)
        for f in (
            instance,
            instance_with_a_final_newline,
            suite,
            enc,
            ciphertext,
            request_id,
            long_request_id,
        )
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations())
def test_malformed_requests_are_invalid_argument_and_change_nothing(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity, what: str, mutate: Any
) -> None:
    head, calls = mesh.states[0].head(coins), mesh.states[0].calls["Execute"]
    request = _execute_request(_seal(admin, coins, alice))
    mutate(request)
    channel, stub = _stub(mesh)
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.Execute(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    assert (mesh.states[0].head(coins), mesh.states[0].calls["Execute"]) == (head, calls)


def test_undecodable_bytes_are_invalid_argument(mesh: InProcessMesh) -> None:
    channel, _ = _stub(mesh)
    execute: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/veil.gateway.v1.GatewayService/Execute"
    )
    with channel, pytest.raises(grpc.RpcError) as refused:
        execute(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert _code(refused) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert mesh.states[0].calls["Execute"] == 0


def test_wrong_instance_is_not_found_and_changes_nothing(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    head = mesh.states[0].head(coins)
    request = _execute_request(_seal(admin, coins, alice))
    request.instance_id = "no-such-instance"
    channel, stub = _stub(mesh)
    with channel:
        with pytest.raises(grpc.RpcError) as missing:
            stub.Execute(request, timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as attest:
            stub.GetAttestation(gateway_pb2.GetAttestationRequest(instance_id="no-such-instance"), timeout=5)
        assert attest.value.code() == grpc.StatusCode.NOT_FOUND
    assert mesh.states[0].head(coins) == head


@pytest.fixture
def guarded_mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    auth = tmp_path / "gateway-auth.json"
    key_hash = "sha256:" + hashlib.sha256(b"letmein").hexdigest()
    auth.write_text(
        json.dumps(
            {
                "default": {"type": "none"},
                "instances": {"coins": {"type": "api_key", "keys": {"bot": key_hash}}},
            }
        )
    )
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"auth_file": auth})


def test_unauthenticated_requests_are_refused_and_change_nothing(guarded_mesh: InProcessMesh) -> None:
    alice = new_identity(guarded_mesh.data_dir, "alice")
    with guarded_mesh.connect(api_key="letmein") as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        admin.token("coins", alice).mint(alice.account, 10)
        head = guarded_mesh.states[0].head("coins")
        calls = guarded_mesh.states[0].calls["Execute"]
        request = _execute_request(_seal(admin, "coins", alice))
    channel, stub = _stub(guarded_mesh)
    with channel:
        for metadata in ((), (("x-api-key", "wrong"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Execute(request, timeout=5, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as attest:
                stub.GetAttestation(gateway_pb2.GetAttestationRequest(instance_id="coins"), metadata=metadata)
            assert attest.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert guarded_mesh.states[0].calls["Execute"] == calls
        assert guarded_mesh.states[0].head("coins") == head
        reply = stub.Execute(request, timeout=5, metadata=(("x-api-key", "letmein"),))
    assert reply.outcome.accepted
    assert guarded_mesh.states[0].head("coins") == head + 1


@pytest.fixture
def throttled_mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"rate_per_second": 0.5, "burst": 3})


def test_rate_limit_answers_resource_exhausted_with_a_retry_hint(throttled_mesh: InProcessMesh) -> None:
    channel = _public(throttled_mesh)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    with channel:
        for _ in range(3):
            stub.GetAttestation(gateway_pb2.GetAttestationRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as limited:
            stub.GetAttestation(gateway_pb2.GetAttestationRequest(), timeout=5)
    assert _code(limited) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    status = rpc_status.from_call(limited.value)  # type: ignore[arg-type]
    assert status is not None
    hints = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(hints) == 1
    retry = error_details_pb2.RetryInfo()
    hints[0].Unpack(retry)
    assert 0 < retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 <= 2.0
    assert throttled_mesh.states[0].calls["GetAttestation"] == 3


def test_sdk_honours_the_retry_hint(pki_dir: Path, tmp_path: Path) -> None:
    for mesh in mesh_fixture(pki_dir, tmp_path, gateway_options={"rate_per_second": 20.0, "burst": 1}):
        with mesh.connect(admin=False) as client:
            for _ in range(5):
                client.attest(refresh=True)  # each would be refused without the SDK's retries
        assert mesh.states[0].calls["GetAttestation"] == 6


def test_replayed_request_id_executes_once(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    state = mesh.states[0]
    head, calls = state.head(coins), state.calls["Execute"]
    sealed = _seal(admin, coins, alice, amount=7)
    request = _execute_request(sealed)
    channel, stub = _stub(mesh)
    with channel:
        replies: list[gateway_pb2.ExecuteResponse] = []
        threads = [
            threading.Thread(target=lambda: replies.append(stub.Execute(request, timeout=10)))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        replies.append(stub.Execute(request, timeout=10))  # a later retry
    assert len(replies) == 7
    assert all(r == replies[0] for r in replies)
    assert state.calls["Execute"] == calls + 1
    assert state.head(coins) == head + 1
    opened = open_outcome(
        sealed, replies[0].outcome, admin.attest(coins).keys.signing_public_key, query=False
    )
    assert opened.accepted
    assert opened.result.result.token.transfer.amount == 993


def test_reused_request_id_with_other_bytes_is_left_to_the_state_service(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    first = _seal(admin, coins, alice, amount=1)
    second = _seal(admin, coins, alice, amount=2)
    replay = gateway_pb2.ExecuteRequest(
        instance_id=coins, command=second.command, request_id=first.request_id
    )
    channel, stub = _stub(mesh)
    with channel:
        original = stub.Execute(_execute_request(first), timeout=10)
        answer = stub.Execute(replay, timeout=10)
    assert mesh.states[0].calls["Execute"] >= 2  # not answered from the gateway's cache
    assert answer == original  # the state service's durable dedupe returns the first result


def test_deadline_is_propagated_to_the_state_replica(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    mesh.states[0].delay = 3.0
    request = _execute_request(_seal(admin, coins, alice))
    channel, stub = _stub(mesh)
    started = time.monotonic()
    with channel, pytest.raises(grpc.RpcError) as late:
        stub.Execute(request, timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5  # ended at the caller's deadline, not after the delay
    seen = mesh.states[0].deadlines[-1]
    assert seen is not None
    assert seen < 1.0  # the caller's 0.5 s travelled on (the gateway's own default is 30 s)


@pytest.fixture
def sharded(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path, replicas=2)


def test_instances_spread_over_shards_and_list_fans_out(sharded: InProcessMesh) -> None:
    alice = new_identity(sharded.data_dir, "alice")
    with sharded.connect() as admin:
        # Placement hashes the id over the replicas' addresses (random ports here): eight ids
        # all landed on one replica once in 128 runs, so ids are added until both are used (40
        # ids all on one replica: once in 2**39).
        created: dict[str, str] = {}
        for i in range(40):
            name = f"ledger-{i}"
            created[name] = admin.create_instance(name, token_config(alice.public_key))[0].shard
            if i >= 7 and set(created.values()) == set(sharded.state_addresses):
                break
        assert set(created.values()) == set(sharded.state_addresses)
        for name in created:  # each instance answers from its own shard's enclave (own keys)
            assert admin.token(name, alice).mint(alice.account, 5) == 5
        listed = {i.instance_id: i.shard for i in admin.list_instances()}
    assert listed == created
    keys = {state.keys.hpke_x25519_public_key for state in sharded.states}
    assert len(keys) == 2


def test_explicit_shard_map_places_an_instance(pki_dir: Path, tmp_path: Path) -> None:
    for mesh in mesh_fixture(pki_dir, tmp_path, replicas=2, pin={"pinned": 1, "other": 0}):
        alice = new_identity(mesh.data_dir, "alice")
        with mesh.connect() as admin:
            assert (
                admin.create_instance("pinned", token_config(alice.public_key))[0].shard
                == mesh.state_addresses[1]
            )
            assert (
                admin.create_instance("other", token_config(alice.public_key))[0].shard
                == mesh.state_addresses[0]
            )
        assert [state.calls["CreateInstance"] for state in mesh.states] == [1, 1]


def test_watch_receipts_streams_only_the_callers_own_outcomes(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    stream = admin.watch_receipts(coins, identity=alice, replay_recent=True)
    received: list[Any] = []
    reader = threading.Thread(target=lambda: received.extend(stream), daemon=True)
    reader.start()
    token = admin.token(coins, alice)
    token.transfer(BOB, 1)
    token.transfer(BOB, 2)
    with mesh.connect() as other:  # another session: another request_id prefix
        other_stream = other.watch_receipts(coins, replay_recent=True)
        other_received: list[Any] = []
        other_reader = threading.Thread(target=lambda: other_received.extend(other_stream), daemon=True)
        other_reader.start()
        deadline = time.monotonic() + 5
        while len(received) < 3 and time.monotonic() < deadline:  # mint (fixture) + two transfers
            time.sleep(0.05)
        other_stream.cancel()
        other_reader.join(5)
    stream.cancel()
    reader.join(5)
    amounts = [opened.result.result.token for opened in received]
    assert [a.WhichOneof("method") for a in amounts] == ["mint", "transfer", "transfer"]
    assert all(opened.receipt is not None and opened.accepted for opened in received)
    assert other_received == []


def test_watch_receipts_needs_a_session_prefix(mesh: InProcessMesh, coins: str) -> None:
    channel, stub = _stub(mesh)
    with channel, pytest.raises(grpc.RpcError) as refused:
        next(
            iter(
                stub.WatchReceipts(
                    gateway_pb2.WatchReceiptsRequest(instance_id=coins, request_id_prefix="abc")
                )
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class _Keyvault(keyvault_pb2_grpc.KeyvaultServiceServicer):
    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority

    def GetJwks(self, request: keyvault_pb2.GetJwksRequest, context: grpc.ServicerContext) -> Any:
        return keyvault_pb2.GetJwksResponse(jwks_json=self.authority.jwks_json())


def test_jwks_comes_from_the_keyvault_when_the_bundle_lacks_it(
    pki_dir: Path, tmp_path: Path, service_config: Any
) -> None:
    for broken in mesh_fixture(pki_dir, tmp_path / "broken", jwks_in_bundle=False):
        with pytest.raises(GatewayError) as unavailable:
            broken.connect(timeout=3)  # the SDK retries UNAVAILABLE until its deadline
        assert (unavailable.value.code, unavailable.value.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "JWKS_UNAVAILABLE",
        )

    authority = TokenAuthority(tmp_path / "kv")
    servicer = _Keyvault(authority)  # type: ignore[abstract]  # only GetJwks is needed; others UNIMPLEMENTED
    keyvault = build_server(
        service_config("keyvault"),
        register=lambda s: keyvault_pb2_grpc.add_KeyvaultServiceServicer_to_server(servicer, s),
        service_names=["veil.keyvault.v1.KeyvaultService"],
        authorization=ids.method_names(
            "veil.keyvault.v1.KeyvaultService", {"GetJwks": frozenset({ids.GATEWAY})}
        ),
    )
    keyvault.start()
    try:
        mesh = start_mesh(
            pki_dir,
            tmp_path / "ok",
            authority,
            jwks_in_bundle=False,
            gateway_options={"keyvault_address": f"127.0.0.1:{keyvault.port}"},
        )
        try:
            with mesh.connect() as client:
                assert client.attestation.issuer == "https://keyvault.veil.test"
        finally:
            mesh.stop()
    finally:
        keyvault.stop(0)
        authority.close()


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED]
)
def test_upstream_internals_do_not_leak(code: grpc.StatusCode) -> None:
    error = translate(
        FailedCall(code, "Traceback: secret path /srv/state/db and key 0xdeadbeef"), "10.0.0.7:50053"
    )
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "secret" not in error.message
    assert "10.0.0.7" not in error.message


def test_upstream_request_errors_are_passed_on() -> None:
    error = translate(FailedCall(grpc.StatusCode.NOT_FOUND, "unknown instance"), "10.0.0.7:50053")
    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "unknown instance")


def test_listing_is_unavailable_when_a_shard_is_down(sharded: InProcessMesh) -> None:
    sharded.state_servers[1].stop(0)
    with sharded.connect(timeout=3) as admin, pytest.raises(GatewayError) as down:
        admin.list_instances()  # retried until the deadline, then the last error
    assert (down.value.code, down.value.reason) == (grpc.StatusCode.UNAVAILABLE, "SHARD_UNAVAILABLE")
