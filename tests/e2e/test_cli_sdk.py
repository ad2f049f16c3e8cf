"""The Python SDK end to end against real processes (`veil up`): each app, replay and refusals.

The gateway, the state service with its enclave runner, and the keyvault are the real
processes; the SDK verifies the real attestation bundle (sim quote over the dev PCK chain,
keyvault token) before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import Mesh
from veil import AttestationError, CommandRefused, ExpectedMeasurement, VeilClient, connect, load_policy
from veil.dev.loadclient import token_config_for
from veil.dev.pki import admin_tls
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.sdk.identity import SigningIdentity, new_identity
from veil.sdk.sealing import open_outcome, seal_command
from veil.services.common.channels import secure_channel

pytestmark = pytest.mark.e2e


def _connect(mesh: Mesh, policy: ExpectedMeasurement | None = None) -> VeilClient:
    pki = mesh.data_dir / "pki"
    return connect(
        mesh.gateway,
        policy=policy or load_policy(mesh.data_dir / "expected-measurement.json"),
        ca=pki / "ca.pem",
        cert=pki / "admin.pem",
        key=pki / "admin-key.pem",
        data_dir=mesh.data_dir,
    )


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> Iterator[VeilClient]:
    with _connect(mesh) as veil:
        yield veil


def _person(mesh: Mesh, name: str) -> SigningIdentity:
    return new_identity(mesh.data_dir, f"sdk-{name}", force=True)


def _sequence(client: VeilClient, instance_id: str) -> int:
    return next(i.sequence for i in client.list_instances() if i.instance_id == instance_id)


def test_token(mesh: Mesh, client: VeilClient) -> None:
    issuer, alice = _person(mesh, "issuer"), _person(mesh, "alice")
    config = token_config_for(issuer.public_key)
    client.create_instance("sdk-coins", config)
    assert client.token("sdk-coins", issuer).mint(alice.account, 50) == 50
    assert client.token("sdk-coins", alice).transfer(issuer.account, 20) == 30
    with pytest.raises(CommandRefused) as overdraw:
        client.token("sdk-coins", alice).transfer(issuer.account, 31)
    assert overdraw.value.receipt is not None
    assert client.token("sdk-coins", alice).balance() == 30


def test_vault(mesh: Mesh, client: VeilClient) -> None:
    owner, reader = _person(mesh, "owner"), _person(mesh, "reader")
    client.create_instance(
        "sdk-records",
        envelope_pb2.InstanceConfig(
            app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE
        ),
    )
    vault = client.vault("sdk-records", owner)
    assert vault.put("id-card", b"\x00binary\xff") is True
    vault.share("id-card", reader.account)
    assert client.vault("sdk-records", reader).get("id-card", owner=owner.account).data == b"\x00binary\xff"
    vault.delete("id-card")
    with pytest.raises(CommandRefused):
        vault.get("id-card")


def test_ballot(mesh: Mesh, client: VeilClient) -> None:
    chair, voters = _person(mesh, "chair"), [_person(mesh, f"voter{i}") for i in range(3)]
    client.create_instance(
        "sdk-polls",
        envelope_pb2.InstanceConfig(
            app=envelope_pb2.APP_KIND_BALLOT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE
        ),
    )
    client.ballot("sdk-polls", chair).create(
        "q", "Tabs or spaces?", ["tabs", "spaces"], [v.account for v in voters]
    )
    receipts = [client.ballot("sdk-polls", v).vote("q", i % 2) for i, v in enumerate(voters)]
    tally = client.ballot("sdk-polls", chair).close("q")
    assert tally.counts == (2, 1)
    for voter, receipt in zip(voters, receipts, strict=True):
        assert client.ballot("sdk-polls", voter).verify_vote(receipt).tally == tally


def test_replayed_request_id_executes_once(mesh: Mesh, client: VeilClient) -> None:
    issuer = _person(mesh, "replayer")
    config = token_config_for(issuer.public_key)
    client.create_instance("sdk-replay", config)
    attestation = client.attest("sdk-replay")
    call = apps_pb2.AppCall(token=apps_pb2.TokenCall(mint=apps_pb2.TokenMint(to=issuer.account, amount=5)))
    sealed = seal_command(
        attestation.keys,
        instance_id="sdk-replay",
        scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        identity=issuer,
        call=call,
        counter=1,
        request_id=client.new_request_id(),
    )
    request = gateway_pb2.ExecuteRequest(
        instance_id="sdk-replay", command=sealed.command, request_id=sealed.request_id
    )
    before = _sequence(client, "sdk-replay")
    with secure_channel(mesh.gateway, admin_tls(mesh.data_dir / "pki")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        replies = [stub.Execute(request, timeout=30) for _ in range(3)]
    assert all(reply == replies[0] for reply in replies)
    assert _sequence(client, "sdk-replay") == before + 1
    opened = open_outcome(sealed, replies[0].outcome, attestation.keys.signing_public_key, query=False)
    assert opened.result.result.token.mint.amount == 5


def test_wrong_instance_is_not_found(client: VeilClient) -> None:
    with pytest.raises(Exception) as missing:
        client.attest("sdk-no-such-instance")
    assert getattr(missing.value, "code", None) == grpc.StatusCode.NOT_FOUND


def test_client_pinned_to_another_measurement_refuses(mesh: Mesh, tmp_path: Path) -> None:
    genuine = load_policy(mesh.data_dir / "expected-measurement.json")
    other = ExpectedMeasurement(
        mrenclaves=(bytes(32),),
        root="dev",
        accepted_tcb_statuses=genuine.accepted_tcb_statuses,
        jwks=genuine.jwks,
    )
    with pytest.raises(AttestationError, match="MRENCLAVE"):
        _connect(mesh, other)
