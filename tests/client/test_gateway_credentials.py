"""The gateway never gets a token the enclave accepts (a security review, HIGH): under
AUTH_SCHEME_OAUTH2 the sealed JWT is the account's only proof and nothing ties it to the
command, and the SDK sent that very JWT to the gateway as its bearer. The gateway is the host's,
so the host could seal commands of its own as the account (reads need no counter; a write
learns the next one from a sealed refusal). Now the identity's JWT only travels sealed, the
gateway takes its own token for its own audience, and a gateway bearer the enclave could accept
is refused before it is sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt.utils
import pytest

from tests.client.oauth2_support import (
    ENCLAVE_AUDIENCE,
    GATEWAY_AUDIENCE,
    GUARDED,
    OAuth2Mesh,
    oauth2_mesh_fixture,
)
from veil.enclave.v1 import apps_pb2
from veil.sdk.client import VeilClient
from veil.sdk.errors import GatewayCredentialError, GatewayError, IdentityError
from veil.sdk.gateway_auth import audiences, check_bearer
from veil.sdk.identity import OAuth2Identity, new_identity


@pytest.fixture
def world(pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OAuth2Mesh]:
    yield from oauth2_mesh_fixture(pki_dir, tmp_path, monkeypatch)


def _create(world: OAuth2Mesh, instance_id: str = GUARDED) -> None:
    gateway_token = world.idp.token("operator", GATEWAY_AUDIENCE)
    with world.mesh.connect(bearer=gateway_token) as admin:
        admin.create_instance(instance_id, world.idp.config())


def _unconnected(world: OAuth2Mesh, bearer: str) -> VeilClient:
    """A client that has sent nothing yet (`connect` attests the default shard at once)."""
    pki = world.mesh.pki_dir
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "admin-key.pem").read_bytes(),
        certificate_chain=(pki / "admin.pem").read_bytes(),
    )
    channel = grpc.secure_channel(world.mesh.address, credentials)
    return VeilClient(channel, policy=world.mesh.policy(), data_dir=world.mesh.data_dir, bearer=bearer)


def _put(record: str) -> apps_pb2.AppCall:
    put = apps_pb2.VaultPut(record_id=record, data=b"P1234567")
    return apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=put))


def test_the_identitys_jwt_travels_sealed_only_and_the_gateway_gets_its_own_token(world: OAuth2Mesh) -> None:
    _create(world)
    enclave_jwt = world.idp.token("alice", ENCLAVE_AUDIENCE)
    gateway_jwt = world.idp.token("alice", GATEWAY_AUDIENCE)
    alice = OAuth2Identity(enclave_jwt)
    world.seen.clear()
    with world.mesh.connect(bearer=gateway_jwt) as client:
        vault = client.vault(GUARDED, alice)
        assert vault.put("passport", b"P1234567")
        assert vault.get("passport").data == b"P1234567"
        results = client.execute_many(GUARDED, [_put("a"), _put("b")], alice)
        assert all(not isinstance(r, Exception) and r.accepted for r in results), results
        stream = client.watch_receipts(GUARDED, identity=alice, replay_recent=True)
        stream.cancel()
    assert world.states_called("Execute", "ExecuteBatch") >= 2
    assert world.states_called("Query") >= 1
    # GetAttestation, Execute, Query, ExecuteBatch (and WatchReceipts) all came through the
    # gateway's oauth2 plugin with the gateway's token; the enclave's JWT was in none of them.
    assert len(world.seen) >= 4
    for metadata in world.seen:
        assert metadata.get("authorization") == f"Bearer {gateway_jwt}"
        signature = enclave_jwt.split(".")[2]
        assert not any(enclave_jwt in value or signature in value for value in metadata.values())


def test_an_oauth2_identity_alone_sends_no_bearer(world: OAuth2Mesh) -> None:
    """The SDK no longer borrows the identity's JWT as the gateway's credential: on an instance
    the gateway does not guard the calls run with no bearer at all, and the one it guards is
    refused at the gateway until the client is given the gateway's own token."""
    _create(world, "open-ids")
    _create(world)
    alice = OAuth2Identity(world.idp.token("alice", ENCLAVE_AUDIENCE))
    world.seen.clear()
    with world.mesh.connect() as client:
        vault = client.vault("open-ids", alice)
        vault.put("passport", b"P1234567")
        assert vault.get("passport").data == b"P1234567"
        assert world.states_called("Execute", "Query") >= 2
        with pytest.raises(GatewayError, match="bearer token"):
            client.vault(GUARDED, alice).get("passport")
    assert world.seen
    assert all("authorization" not in metadata for metadata in world.seen)


@pytest.mark.parametrize("bearer_is", ["the-identitys-own-jwt", "another-for-the-enclave", "one-for-both"])
def test_a_gateway_bearer_the_enclave_would_accept_is_refused_before_anything_is_sent(
    world: OAuth2Mesh, bearer_is: str
) -> None:
    _create(world)
    enclave_jwt = world.idp.token("alice", ENCLAVE_AUDIENCE)
    alice = OAuth2Identity(enclave_jwt)
    bearer = {
        "the-identitys-own-jwt": enclave_jwt,
        "another-for-the-enclave": world.idp.token("mallory", ENCLAVE_AUDIENCE),
        "one-for-both": world.idp.token("alice", [GATEWAY_AUDIENCE, ENCLAVE_AUDIENCE]),
    }[bearer_is]
    world.seen.clear()
    before = world.states_called("GetAttestation", "Execute", "ExecuteBatch", "Query")
    with _unconnected(world, bearer) as client:
        vault = client.vault(GUARDED, alice)
        for attempt in (
            lambda: vault.put("passport", b"P1234567"),
            lambda: vault.get("passport"),
            lambda: client.execute_many(GUARDED, [_put("a")], alice),
            lambda: client.watch_receipts(GUARDED, identity=alice),
        ):
            with pytest.raises(GatewayCredentialError, match="enclave"):
                attempt()
        assert client.calls.pending(GUARDED, "alice") == []  # nothing kept: nothing was sealed
    assert world.seen == []  # not even an attestation request
    assert world.states_called("GetAttestation", "Execute", "ExecuteBatch", "Query") == before


def test_a_bearer_for_an_attested_enclaves_audience_is_refused_whoever_acts(world: OAuth2Mesh) -> None:
    """Without an OAuth2 identity at hand the client learns the enclave's audience from the
    instance's signed descriptor; from then on nothing more goes with such a bearer."""
    _create(world, "open-ids")  # guarded by no plugin at the gateway
    bob = new_identity(world.mesh.data_dir, "bob")
    leaked = world.idp.token("carol", ENCLAVE_AUDIENCE)
    with _unconnected(world, leaked) as client:
        with pytest.raises(GatewayCredentialError, match=ENCLAVE_AUDIENCE):
            client.attest("open-ids")
        world.seen.clear()
        for attempt in (client.status, lambda: client.vault("open-ids", bob).get("x")):
            with pytest.raises(GatewayCredentialError):
                attempt()
    assert world.seen == []
    assert world.states_called("Execute", "ExecuteBatch", "Query") == 0


def test_an_opaque_or_other_audience_bearer_passes(world: OAuth2Mesh) -> None:
    _create(world, "open-ids")
    alice = OAuth2Identity(world.idp.token("alice", ENCLAVE_AUDIENCE))
    for bearer in ("opaque-gateway-token", world.idp.token("alice", GATEWAY_AUDIENCE)):
        with world.mesh.connect(bearer=bearer) as client:
            client.vault("open-ids", alice).put("r", b"x")


def test_identities_carry_no_gateway_credential() -> None:
    """`bearer` (the identity's credential for the gateway) is gone from every identity."""
    assert not hasattr(OAuth2Identity("x.y.z"), "bearer")
    with pytest.raises(IdentityError):
        _ = OAuth2Identity("not a jwt").account


def test_creating_an_instance_whose_enclave_takes_the_bearers_audience_sends_nothing(
    world: OAuth2Mesh,
) -> None:
    """The new instance's enclave will accept its configured audience: a gateway bearer for it
    is refused before CreateInstance (it went with CreateInstance and the attestation that
    followed, refused only then, the instance left created and unpinned: a second review)."""
    leaked = world.idp.token("operator", ENCLAVE_AUDIENCE)
    with _unconnected(world, leaked) as admin:
        world.seen.clear()
        before = world.states_called("CreateInstance", "GetAttestation")
        with pytest.raises(GatewayCredentialError, match=ENCLAVE_AUDIENCE):
            admin.create_instance("fresh-ids", world.idp.config())
    assert world.seen == []
    assert world.states_called("CreateInstance", "GetAttestation") == before


def test_the_audience_is_read_as_the_enclave_reads_it() -> None:
    """A `"b64": false` header made PyJWT see no claims, so no audience to refuse, while the
    enclave's reader takes the claims segment as base64url JSON whatever the header says."""
    header = jwt.utils.base64url_encode(json.dumps({"alg": "ES256", "b64": False, "crit": ["b64"]}).encode())
    claims = jwt.utils.base64url_encode(json.dumps({"aud": ENCLAVE_AUDIENCE, "sub": "x"}).encode())
    token = b".".join((header, claims, b"c2ln")).decode()
    assert audiences(token) == {ENCLAVE_AUDIENCE}
    with pytest.raises(GatewayCredentialError):
        check_bearer(token, enclave_audiences=[ENCLAVE_AUDIENCE])
    assert audiences("opaque") == audiences("a.!!.c") == frozenset()
