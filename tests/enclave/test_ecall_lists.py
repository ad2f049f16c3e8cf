"""A frame that carries a list of calls: run in order, each answered exactly as if it had crossed
alone; a malformed call is refused alone and the others still run; a call that carries calls is
refused (no nesting), and so is a frame that names a method beside its list (nothing runs)."""

from __future__ import annotations

from google.protobuf.message import Message

from tests.enclave.support import Harness, config, head_confirmation, vault
from veil.enclave.errors import FAILED_PRECONDITION, INVALID_ARGUMENT, PERMISSION_DENIED, UNIMPLEMENTED
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2
from veil.services.state.enclave_host import EnclaveCallError
from veil.services.state.startup import confirm_call


def _call(method: str, request: Message) -> ecall_pb2.EcallFrame:
    return ecall_pb2.EcallFrame(method=method, payload=request.SerializeToString(deterministic=True))


def _cross(h: Harness, frame: ecall_pb2.EcallFrame) -> ecall_pb2.EcallReply:
    return ecall_pb2.EcallReply.FromString(h.host._transport.roundtrip(frame.SerializeToString()))


def _two_held_heads(h: Harness) -> tuple[envelope_pb2.CommitHead, envelope_pb2.CommitHead]:
    """A strict instance with two batches held (heads 2 and 3), nothing confirmed past 1."""
    h.create("v", config())
    h.auto_confirm = False
    alice = h.client("v")
    heads = []
    for i in range(2):
        sealed = alice.seal(vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x")))
        response = h.execute("v", [sealed.command])
        assert response.held_until == response.link.head.sequence
        heads.append(response.link.head)
    return heads[0], heads[1]


def _confirmed(h: Harness) -> int:
    [instance] = h.host.get_status().instances
    return instance.confirmed.sequence


def test_each_call_of_a_list_is_answered_as_if_alone_and_a_malformed_one_alone_is_refused(
    harness: Harness,
) -> None:
    h = harness
    status = ecall_pb2.GetStatusRequest()
    alone = _cross(h, _call("GetStatus", status))
    frame = ecall_pb2.EcallFrame(
        calls=[
            _call("GetStatus", status),
            ecall_pb2.EcallFrame(method="NoSuchCall"),
            ecall_pb2.EcallFrame(method="ConfirmHead", payload=b"\xff\xff\xff"),  # not a message
            ecall_pb2.EcallFrame(calls=[_call("GetStatus", status)]),  # a nested list
            ecall_pb2.EcallFrame(method="GetStatus", calls=[_call("GetStatus", status)]),
            _call("GetStatus", status),
        ]
    )
    reply = _cross(h, frame)
    assert not reply.HasField("error")
    assert not reply.payload
    first, unknown, garbled, nested, beside, last = reply.replies
    assert first == alone == last
    assert (unknown.error.code, unknown.payload) == (UNIMPLEMENTED, b"")
    assert garbled.error.code == INVALID_ARGUMENT
    assert nested.error.code == beside.error.code == INVALID_ARGUMENT


def test_calls_run_strictly_in_order_and_a_refused_one_stops_none_of_the_others(harness: Harness) -> None:
    """The newer confirmation first, then the older: the enclave refuses the older (a head no
    longer on its chain), exactly as two separate crossings in that order would; a call with a
    forged signature is refused alone between them; the list in the other order takes both."""
    h = harness
    second, third = _two_held_heads(h)
    key = h.keys.signing_public_key
    forged = head_confirmation("v", third, key)
    forged.signature = bytes(64)
    calls = [
        confirm_call(c)
        for c in (head_confirmation("v", third, key), forged, head_confirmation("v", second, key))
    ]
    newer, refused, older = h.host.call_all(calls)
    assert isinstance(newer, ecall_pb2.ConfirmHeadResponse)
    assert sorted(hold.held_until for hold in newer.released) == [2, 3]
    assert isinstance(refused, EnclaveCallError)
    assert refused.code == PERMISSION_DENIED
    assert isinstance(older, EnclaveCallError)
    assert older.code == FAILED_PRECONDITION
    assert "not on this enclave's chain" in older.message
    assert _confirmed(h) == 3


def test_the_older_confirmation_first_releases_each_head_in_turn(harness: Harness) -> None:
    h = harness
    second, third = _two_held_heads(h)
    key = h.keys.signing_public_key
    ecalls = h.host.ecalls
    answers = h.host.call_all([confirm_call(head_confirmation("v", head, key)) for head in (second, third)])
    assert h.host.ecalls == ecalls + 1  # one crossing
    released = [
        [hold.held_until for hold in a.released]
        for a in answers
        if isinstance(a, ecall_pb2.ConfirmHeadResponse)
    ]
    assert released == [[2], [3]]
    assert _confirmed(h) == 3


def test_a_frame_naming_a_method_beside_its_list_is_refused_whole_and_runs_nothing(harness: Harness) -> None:
    h = harness
    _, third = _two_held_heads(h)
    confirm = _call(
        "ConfirmHead",
        ecall_pb2.ConfirmHeadRequest(confirmation=head_confirmation("v", third, h.keys.signing_public_key)),
    )
    reply = _cross(h, ecall_pb2.EcallFrame(method="GetStatus", calls=[confirm]))
    assert reply.error.code == INVALID_ARGUMENT
    assert not reply.replies
    assert _confirmed(h) == 1  # the confirmation inside did not run
