"""A sealed command over the gateway's request limit is refused before it is kept or sent.

The gateway refuses such a request unread (RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE), and every
resend carries the same bytes: kept, the call could never be answered, and the account's later
calls waited for its counter for good (a new user's 2 MB `veil vault put` wedged the account).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.sdk.client import MAX_REQUEST_BYTES, VeilClient
from veil.sdk.errors import GatewayError, RequestTooLarge
from veil.sdk.identity import SigningIdentity, new_identity

BIG = b"x" * (MAX_REQUEST_BYTES + 1)


@pytest.fixture
def admin(mesh: InProcessMesh) -> Iterator[VeilClient]:
    with mesh.connect() as client:
        client.create_instance(
            "records",
            envelope_pb2.InstanceConfig(
                app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE
            ),
        )
        yield client


def _sent(mesh: InProcessMesh) -> int:
    return sum(state.calls["Execute"] + state.calls["ExecuteBatch"] for state in mesh.states)


def _nothing_kept(client: VeilClient, alice: SigningIdentity) -> None:
    assert client.calls.pending("records", alice.account) == []
    assert client.counters.sealed("records", alice.account) == client.counters.last("records", alice.account)


def test_an_oversized_put_is_refused_unsent_and_the_next_put_runs(
    mesh: InProcessMesh, admin: VeilClient
) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    records = admin.vault("records", alice)
    assert records.put("small", b"before") is True
    sent = _sent(mesh)
    with pytest.raises(RequestTooLarge, match="nothing was sent") as refused:
        records.put("big", BIG, request_id="row-1")
    assert refused.value.limit == MAX_REQUEST_BYTES
    assert refused.value.size > MAX_REQUEST_BYTES
    assert refused.value.request_id is None  # nothing to resume
    assert _sent(mesh) == sent
    _nothing_kept(admin, alice)
    assert records.put("after", b"runs") is True  # not waiting for the refused call's counter
    assert records.get("after").data == b"runs"


def test_an_oversized_command_in_a_batch_sends_none_of_it(mesh: InProcessMesh, admin: VeilClient) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    puts = [
        apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id=name, data=data)))
        for name, data in (("a", b"1"), ("big", BIG), ("c", b"3"))
    ]
    sent = _sent(mesh)
    with pytest.raises(RequestTooLarge):
        admin.execute_many("records", puts, alice)
    assert _sent(mesh) == sent
    _nothing_kept(admin, alice)
    assert all(result.accepted for result in admin.execute_many("records", puts[::2], alice))  # type: ignore[union-attr]


def test_a_limit_raised_past_the_gateways_meets_its_refusal_and_the_call_is_kept(
    mesh: InProcessMesh,
) -> None:
    """The client's limit stands in for the gateway's. Raised past it, the command goes and the
    gateway refuses it unread; the SDK cannot tell that refusal from a host's lie (the sealing
    may be held and run later), so the call is kept under its request id, as for any refusal
    without a definitive answer."""
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect(max_request_bytes=2 * MAX_REQUEST_BYTES) as client:
        client.create_instance(
            "records",
            envelope_pb2.InstanceConfig(
                app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE
            ),
        )
        with pytest.raises(GatewayError) as refused:
            client.vault("records", alice).put("big", BIG, request_id="row-1")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.request_id == "row-1"
        assert [call.request_id for call in client.calls.pending("records", alice.account)] == ["row-1"]
