"""A call over the gateway's request limit when the client cannot know that limit or resumes:
review tests of the RequestTooLarge change (fresh-context reviews, adopted).

- The gateway's VEIL_GATEWAY_MAX_MESSAGE_BYTES below the client's: a command between the two is
  kept, sent and refused unread; the SDK uses its counter up with the app's read-only command
  (the sealing the host holds can then never run), drops the call, and the account goes on.
- A call that WAS sent, resumed, whose re-sealing is over the limit (another suite, a grown
  OAuth2 token): kept, its request id told, never a new call under its counter.
- A batch mixing a resumed call and an oversized one: nothing sent, the resumed call kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client.test_request_too_large import create_records, sent_to_state
from tests.gateway.support import InProcessMesh, mesh_fixture
from veil.enclave.v1 import apps_pb2
from veil.sdk.client import VeilClient
from veil.sdk.errors import CommandRefused, GatewayError, OutcomeUnknown, RequestTooLarge
from veil.sdk.identity import SigningIdentity, new_identity
from veil.sdk.sealing import MLKEM768X25519_SUITE, X25519_SUITE

GATEWAY_LIMIT = 64 * 1024
BIG = b"x" * (2 * GATEWAY_LIMIT)


@pytest.fixture
def small_gateway(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"max_message_bytes": GATEWAY_LIMIT})


def test_a_call_the_gateway_refuses_as_too_large_is_settled_and_the_account_goes_on(
    small_gateway: InProcessMesh, monkeypatch: Any
) -> None:
    mesh = small_gateway
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect(timeout=3) as client:  # the default max_request_bytes: 1 MiB
        create_records(client)
        honest = client._execute
        sent: list[Any] = []

        def recording(sealed: Any, identity: Any) -> Any:
            sent.append(sealed)
            return honest(sealed, identity)

        monkeypatch.setattr(client, "_execute", recording)
        records = client.vault("records", alice)
        with pytest.raises(RequestTooLarge, match="nothing ran") as refused:
            records.put("big", BIG, request_id="r1")
        assert refused.value.sent
        held = [s for s in sent if s.request_id == "r1"]
        assert held
        assert client.calls.get("r1") is None
        # The host held r1's sealing and runs it now, bypassing its gateway: the counter is used.
        (outcome,) = mesh.states[0].harness.execute("records", [held[0].command]).outcomes
        assert not outcome.accepted
        assert records.put("small", b"1") is True
        with pytest.raises(CommandRefused, match="not found"):  # r1 never ran
            records.get("big")


LIMIT = 4096


def _unopenable() -> GatewayError:
    error = GatewayError.__new__(GatewayError)
    Exception.__init__(error, "INVALID_ARGUMENT: the enclave could not open the command")
    error.code, error.reason, error.details = (
        grpc.StatusCode.INVALID_ARGUMENT,
        "COMMAND_UNOPENABLE",
        "could not open",
    )
    error.request_id = None
    return error


def _holding_r1(client: VeilClient, monkeypatch: Any) -> tuple[Any, list[Any]]:
    """The host keeps every sealing of "r1" and claims the enclave could not open it (its
    unauthenticated word: ambiguous, so the SDK re-seals under the same counter); the honest
    send and the sealings held."""
    honest = client._execute
    held: list[Any] = []

    def hostile(sealed: Any, identity: Any) -> Any:
        if sealed.request_id == "r1":
            held.append(sealed)
            raise _unopenable()
        return honest(sealed, identity)

    monkeypatch.setattr(client, "_execute", hostile)
    return honest, held


@dataclass
class HeldR1:
    """A client on a mesh whose host holds every sealing of "r1" (`_holding_r1`)."""

    client: VeilClient
    alice: SigningIdentity
    honest: Any
    held: list[Any]


@pytest.fixture
def r1(mesh: InProcessMesh, monkeypatch: Any) -> Iterator[HeldR1]:
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect(max_request_bytes=LIMIT) as client:
        create_records(client)
        honest, held = _holding_r1(client, monkeypatch)
        yield HeldR1(client, alice, honest, held)


def _put(record: str, size: int) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(
        vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id=record, data=b"x" * size))
    )


def test_a_resumed_call_whose_resealing_is_too_large_stays_kept(r1: HeldR1, monkeypatch: Any) -> None:
    client, alice, honest, held = r1.client, r1.alice, r1.honest, r1.held
    call = _put("rec", 3000)  # about 3.3 kB sealed with X25519, 4.4 kB with ML-KEM-768+X25519
    with pytest.raises(OutcomeUnknown) as first:
        client.execute("records", call, alice, request_id="r1", suite=X25519_SUITE)
    assert first.value.request_id == "r1"
    kept = client.calls.get("r1")
    assert kept is not None
    assert kept.sealings
    counter = kept.counter
    mark = client.counters.sealed("records", alice.account)
    assert mark >= counter
    # Resumed under the post-quantum suite: the kept bytes go first (not size-checked: they
    # were sent), the host says "unopenable" again, and the re-sealing is too large.
    with pytest.raises(RequestTooLarge) as resumed:
        client.execute("records", call, alice, request_id="r1", suite=MLKEM768X25519_SUITE)
    assert resumed.value.request_id == "r1"  # the CLI prints the resume hint
    assert resumed.value.earlier_sent
    assert "an earlier sealing of the call was sent and may still run" in str(resumed.value)
    still = client.calls.get("r1")
    assert still is not None
    assert len(still.sealings) == len(kept.sealings)
    assert client.counters.sealed("records", alice.account) == mark  # the mark stands
    # A new call never takes r1's counter: it waits for it (the host holds r1's sealings).
    assert client._next_counter("records", alice.account) > counter
    sent = len(held)
    monkeypatch.setattr(client, "_execute", honest)
    # The host now runs a held sealing of r1 (the first); resuming gets that answer.
    assert sent >= 7
    honest(held[0], alice)
    opened = client.execute("records", call, alice, request_id="r1")
    assert opened.accepted
    assert client.vault("records", alice).put("after", b"1") is True


def test_a_batch_mixing_a_resumed_call_and_an_oversized_one_sends_nothing_and_keeps_the_resumed(
    mesh: InProcessMesh, r1: HeldR1, monkeypatch: Any
) -> None:
    client, alice, honest, _held = r1.client, r1.alice, r1.honest, r1.held
    small = _put("rec", 10)
    with pytest.raises(OutcomeUnknown):
        client.execute("records", small, alice, request_id="r1")
    kept = client.calls.get("r1")
    assert kept is not None
    mark, last = (
        client.counters.sealed("records", alice.account),
        client.counters.last("records", alice.account),
    )
    sent = sent_to_state(mesh)
    with pytest.raises(RequestTooLarge):
        client.execute_many(
            "records",
            [small, _put("a", 1), _put("big", LIMIT), _put("c", 1)],
            alice,
            request_ids=["r1", None, "r-big", "r-c"],
        )
    assert sent_to_state(mesh) == sent
    assert (
        client.counters.sealed("records", alice.account),
        client.counters.last("records", alice.account),
    ) == (
        mark,
        last,
    )
    still = client.calls.get("r1")
    assert still is not None
    assert (still.counter, len(still.sealings)) == (
        kept.counter,
        len(kept.sealings),
    )
    assert client.calls.get("r-big") is None
    assert client.calls.get("r-c") is None
    assert [c.request_id for c in client.calls.pending("records", alice.account)] == ["r1"]
    # The ids of the refused batch start afresh (nothing of them was kept); r1 resumes.
    monkeypatch.setattr(client, "_execute", honest)
    results = client.execute_many("records", [small, _put("c", 1)], alice, request_ids=["r1", "r-c"])
    assert all(getattr(r, "accepted", False) for r in results), results
