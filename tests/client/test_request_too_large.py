"""A sealed command over the gateway's request limit is refused before it is kept or sent.

The gateway refuses such a request unread (RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE), and every
resend carries the same bytes: kept, the call could never be answered, and the account's later
calls waited for its counter for good (a new user's 2 MB `veil vault put` wedged the account).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.sdk.client import MAX_REQUEST_BYTES, VeilClient
from veil.sdk.errors import CommandRefused, RequestTooLarge
from veil.sdk.identity import SigningIdentity, new_identity

BIG = b"x" * (MAX_REQUEST_BYTES + 1)


def create_records(client: VeilClient) -> None:
    """The vault instance "records", signature accounts (the admin's call)."""
    config = envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE
    )
    client.create_instance("records", config)


def sent_to_state(mesh: InProcessMesh) -> int:
    """Execute and ExecuteBatch calls the state replicas were given."""
    return sum(state.calls["Execute"] + state.calls["ExecuteBatch"] for state in mesh.states)


@pytest.fixture
def admin(mesh: InProcessMesh) -> Iterator[VeilClient]:
    with mesh.connect() as client:
        create_records(client)
        yield client


def _nothing_kept(client: VeilClient, alice: SigningIdentity) -> None:
    assert client.calls.pending("records", alice.account) == []
    assert client.counters.sealed("records", alice.account) == client.counters.last("records", alice.account)


def test_an_oversized_put_is_refused_unsent_and_the_next_put_runs(
    mesh: InProcessMesh, admin: VeilClient
) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    records = admin.vault("records", alice)
    assert records.put("small", b"before") is True
    sent = sent_to_state(mesh)
    with pytest.raises(RequestTooLarge, match="nothing was sent") as refused:
        records.put("big", BIG, request_id="row-1")
    assert refused.value.limit == MAX_REQUEST_BYTES
    assert refused.value.size > MAX_REQUEST_BYTES
    assert refused.value.request_id is None  # nothing to resume
    assert sent_to_state(mesh) == sent
    _nothing_kept(admin, alice)
    assert records.put("after", b"runs") is True  # not waiting for the refused call's counter
    assert records.get("after").data == b"runs"


def test_an_oversized_command_in_a_batch_sends_none_of_it(mesh: InProcessMesh, admin: VeilClient) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    puts = [
        apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id=name, data=data)))
        for name, data in (("a", b"1"), ("big", BIG), ("c", b"3"))
    ]
    sent = sent_to_state(mesh)
    with pytest.raises(RequestTooLarge):
        admin.execute_many("records", puts, alice)
    assert sent_to_state(mesh) == sent
    _nothing_kept(admin, alice)
    assert all(result.accepted for result in admin.execute_many("records", puts[::2], alice))  # type: ignore[union-attr]


def test_a_limit_raised_past_the_gateways_has_the_counter_used_up_and_the_call_dropped(
    mesh: InProcessMesh,
) -> None:
    """The client's limit stands in for the gateway's. Raised past it, the command goes and the
    gateway refuses it unread. The SDK cannot tell that refusal from a host's lie (the sealing
    may be held and run later), and a resend is the same bytes: so it uses the call's counter
    up with the app's read-only command, drops the call, and the account's next call runs."""
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect(max_request_bytes=2 * MAX_REQUEST_BYTES) as client:
        create_records(client)
        records = client.vault("records", alice)
        with pytest.raises(RequestTooLarge, match="nothing ran") as refused:
            records.put("big", BIG, request_id="row-1")
        assert refused.value.sent
        assert refused.value.limit == MAX_REQUEST_BYTES  # the gateway's, from its ErrorInfo
        assert refused.value.request_id is None  # nothing to resume
        _nothing_kept(client, alice)
        assert client.counters.last("records", alice.account) == 1  # the filler used counter 1
        assert records.put("after", b"runs") is True
        with pytest.raises(CommandRefused):
            records.get("big")  # the big put never ran
