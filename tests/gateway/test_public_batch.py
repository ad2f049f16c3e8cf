"""Issue 13: the public ExecuteBatch, and the SDK's `execute_many` over it.

Each command of a batch takes Execute's path (plugin, one rate-limit token per command, shape
checks, request_id dedupe, routing) and fails alone; the SDK verifies every answer as `execute`
does and settles what the batch left open through `execute`'s own recovery, so a command whose
answer was lost, reordered or replayed by the host runs exactly once (or is reported unknown,
never sent twice).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from tests.conftest import tls_for
from tests.gateway import support
from tests.gateway.support import InProcessMesh, fail_once, mesh_fixture, token_config
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.sdk.client import MAX_BATCH, VeilClient
from veil.sdk.errors import OutcomeUnknown
from veil.sdk.identity import SigningIdentity, new_identity
from veil.sdk.sealing import SealedRequest, open_outcome, seal_command
from veil.services.common.channels import secure_channel
from veil.state.v1 import state_pb2

BOB = "b0" * 32


def _seal(client: VeilClient, who: SigningIdentity, counter: int, amount: int = 1) -> SealedRequest:
    call = apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=BOB, amount=amount)))
    return seal_command(
        client.attest("coins").keys,
        instance_id="coins",
        scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        identity=who,
        call=call,
        counter=counter,
        request_id=client.new_request_id(),
    )


def _request(sealed: SealedRequest) -> gateway_pb2.ExecuteRequest:
    return gateway_pb2.ExecuteRequest(
        instance_id="coins", command=sealed.command, request_id=sealed.request_id
    )


def _batch(address: str, pki_dir: Path, commands: list[gateway_pb2.ExecuteRequest]) -> dict[int, Any]:
    """index -> ExecuteResponse or google.rpc.Status, over the admin's mTLS channel."""
    with secure_channel(address, tls_for(pki_dir, "admin")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        answers: dict[int, Any] = {}
        for item in stub.ExecuteBatch(gateway_pb2.ExecuteBatchRequest(commands=commands), timeout=15):
            assert item.index not in answers
            answers[item.index] = (
                item.response
                if item.WhichOneof("result") == "response"
                else status_pb2.Status.FromString(item.status)
            )
    return answers


def _code(status: status_pb2.Status) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == status.code)


def test_a_batch_runs_every_command_and_a_bad_one_fails_alone(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    first, second = _seal(admin, alice, 2, amount=10), _seal(admin, alice, 3, amount=20)
    broken = _request(_seal(admin, alice, 9))
    broken.command.ciphertext = b"short"  # the gateway's shape check refuses it
    head = mesh.states[0].head(coins)
    answers = _batch(mesh.address, mesh.pki_dir, [_request(first), broken, _request(second)])
    assert sorted(answers) == [0, 1, 2]
    assert isinstance(answers[1], status_pb2.Status)
    assert _code(answers[1]) == grpc.StatusCode.INVALID_ARGUMENT
    signing_key = admin.attest(coins).keys.signing_public_key
    balances = [
        open_outcome(sealed, answers[i].outcome, signing_key, query=False).result.result.token.transfer.amount
        for i, sealed in ((0, first), (2, second))
    ]
    assert balances == [990, 970]
    assert mesh.states[0].head(coins) == head + 2


def test_an_empty_or_oversized_batch_is_invalid_argument(mesh: InProcessMesh) -> None:
    command = gateway_pb2.ExecuteRequest(instance_id="coins", request_id="r")
    for commands in ([], [command] * (MAX_BATCH + 1)):
        with pytest.raises(grpc.RpcError) as refused:
            _batch(mesh.address, mesh.pki_dir, commands)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mesh.states[0].calls["Execute"] == 0


@pytest.fixture
def throttled(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"rate_per_second": 0.001, "burst": 30})


def test_the_rate_limit_is_charged_per_command(throttled: InProcessMesh) -> None:
    alice = new_identity(throttled.data_dir, "alice")
    with throttled.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        admin.token("coins", alice).mint(alice.account, 1000)
        head = throttled.states[0].head("coins")
        commands = [_request(_seal(admin, alice, counter)) for counter in range(2, 42)]
    answers = _batch(throttled.address, throttled.pki_dir, commands)
    limited = [i for i, a in answers.items() if isinstance(a, status_pb2.Status)]
    ran = [i for i, a in answers.items() if not isinstance(a, status_pb2.Status)]
    # 40 commands against a bucket of 30 that setup drew on: one token each, not one per batch.
    assert len(answers) == 40
    assert len(limited) >= 10
    assert len(ran) >= 20
    assert all(_code(answers[i]) == grpc.StatusCode.RESOURCE_EXHAUSTED for i in limited)
    assert sorted(ran) == list(range(len(ran)))  # the bucket ran dry once, at one point of the batch
    assert throttled.states[0].head("coins") == head + len(ran)


def test_the_sdk_sends_many_transfers_in_one_batch(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    head, executed = mesh.states[0].head(coins), mesh.states[0].calls["Execute"]
    token = admin.token(coins, alice)
    results = token.transfer_many([(BOB, n) for n in range(1, 21)])
    assert [r.error for r in results] == [None] * 20
    assert [r.value for r in results] == [1000 - n * (n + 1) // 2 for n in range(1, 21)]
    assert all(r.opened is not None and r.opened.receipt is not None for r in results)
    assert mesh.states[0].head(coins) == head + 20
    assert mesh.states[0].calls["Execute"] == executed + 20  # each once, nothing resent
    assert admin.counters.last(coins, alice.account) == 21
    assert token.transfer(BOB, 1) == 789  # the next counter follows the batch


def test_a_lost_answer_in_a_batch_is_recovered_without_running_twice(
    mesh: InProcessMesh,
    admin: VeilClient,
    coins: str,
    alice: SigningIdentity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host runs every command but loses the third one's answer: the SDK sends that command
    again under its request id and gets the recorded answer; it runs once."""
    state = mesh.states[0]
    request_ids = [admin.new_request_id() for _ in range(5)]
    lost = fail_once(state, request_ids[2], monkeypatch, lose_answer=True)
    head = state.head(coins)
    results = admin.token(coins, alice).transfer_many([(BOB, 10)] * 5, request_ids=request_ids)
    assert lost
    assert [r.value for r in results] == [990, 980, 970, 960, 950]
    assert state.head(coins) == head + 5
    assert admin.token(coins, alice).balance() == 950


def test_reordered_commands_are_settled_in_counter_order_exactly_once(
    mesh: InProcessMesh,
    admin: VeilClient,
    coins: str,
    alice: SigningIdentity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that runs a batch backwards: every command but the first finds its counter too
    early; the SDK seals those again under the same counters only, and each runs once."""
    original = support.execute_batch_over  # the patched name would call `backwards` itself

    def backwards(execute: Any, request: Any, context: Any) -> Iterator[state_pb2.ExecuteBatchResponse]:
        indexed = list(enumerate(request.commands))
        for index, command in reversed(indexed):
            (item,) = original(execute, state_pb2.ExecuteBatchRequest(commands=[command]), context)
            item.index = index
            yield item

    monkeypatch.setattr(support, "execute_batch_over", backwards)
    head = mesh.states[0].head(coins)
    results = admin.token(coins, alice).transfer_many([(BOB, 1)] * 6)
    assert [r.value for r in results] == [999, 998, 997, 996, 995, 994]
    assert mesh.states[0].head(coins) == head + 6
    assert admin.counters.last(coins, alice.account) == 7


def test_a_replayed_refusal_naming_a_later_command_is_outcome_unknown_not_a_second_run(
    mesh: InProcessMesh,
    admin: VeilClient,
    coins: str,
    alice: SigningIdentity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack behind the four-times bug: the host runs all three commands, then evaluates the
    first one again and returns that refusal (its counter is used; the last command is the
    third). Taking it as "another command used the counter" would re-seal and pay twice."""
    state = mesh.states[0]
    original = support.execute_batch_over

    def replaying(execute: Any, request: Any, context: Any) -> Iterator[state_pb2.ExecuteBatchResponse]:
        answers = list(original(execute, request, context))
        if len(request.commands) == 3:
            (replayed,) = state.harness.execute("coins", [request.commands[0].command]).outcomes
            answers[0] = state_pb2.ExecuteBatchResponse(
                index=0, response=state_pb2.ExecuteResponse(outcome=replayed)
            )
        yield from answers

    monkeypatch.setattr(support, "execute_batch_over", replaying)
    head = state.head(coins)
    results = admin.token(coins, alice).transfer_many([(BOB, 100)] * 3)
    assert isinstance(results[0].error, OutcomeUnknown)
    assert [r.value for r in results[1:]] == [800, 700]
    assert state.head(coins) == head + 3  # three transfers ran, none twice
    assert admin.token(coins, alice).balance() == 700


def test_a_command_refused_before_running_has_its_counter_filled_and_the_later_ones_run_once(
    mesh: InProcessMesh, admin: VeilClient, coins: str, alice: SigningIdentity
) -> None:
    """A call the enclave refuses for good before running (a vault call on a token instance)
    does not use its counter, so the later calls of the batch cannot run under theirs. Their
    sealings stay valid, so they are never sealed under other counters: the SDK uses the gap up
    with a read-only call sent as a command (a balance read), and the later calls run, once."""
    transfer = apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=BOB, amount=5)))
    wrong_app = apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id="r", data=b"x")))
    head = mesh.states[0].head(coins)
    results = admin.execute_many(coins, [transfer, wrong_app, transfer, transfer], alice)
    first, refused, *later = results
    assert not isinstance(first, Exception)
    assert first.accepted
    assert not isinstance(refused, Exception)
    assert not refused.accepted
    assert refused.result.error.code == 1  # INVALID_ARGUMENT, an answer the enclave sealed
    assert [r.result.result.token.transfer.amount for r in later if not isinstance(r, Exception)] == [
        990,
        985,
    ]
    assert mesh.states[0].head(coins) == head + 4  # three transfers and the filler
    assert admin.token(coins, alice).balance() == 985
    assert not admin.calls.pending(coins, alice.account)  # every call settled


def test_the_public_port_serves_batches_and_each_command_is_published_to_its_owner(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Without a client certificate, as Execute: answered, and each accepted command reaches the
    sender's receipt stream like an Execute's."""
    with mesh.connect(admin=False) as client:
        stream = client.watch_receipts(coins, identity=alice)
        results = client.token(coins, alice).transfer_many([(BOB, 5), (BOB, 6)])
        assert [r.value for r in results] == [995, 989]
        seen = []
        for opened in stream:
            seen.append(opened.request_id)
            if len(seen) == 2:
                stream.cancel()
    assert sorted(seen) == sorted(r.opened.request_id for r in results if r.opened)


def test_a_command_the_replica_could_not_take_is_sent_again_by_the_gateway_as_execute_would_be(
    mesh: InProcessMesh,
    admin: VeilClient,
    coins: str,
    alice: SigningIdentity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UNAVAILABLE for one command of the group (before it ran): the gateway sends that command
    again as a plain call, as it retries a unary Execute. The next command of the account found
    its counter too early meanwhile: the SDK's answer to that (a stale "wrong counter" that asks
    for a counter already accepted since) is no rollback; each runs once, in order."""
    state = mesh.states[0]
    request_ids = [admin.new_request_id() for _ in range(3)]
    refused = fail_once(state, request_ids[1], monkeypatch, lose_answer=False)
    executed, head = state.calls["Execute"], state.head(coins)
    results = admin.token(coins, alice).transfer_many([(BOB, 1)] * 3, request_ids=request_ids)
    assert refused
    assert [r.value for r in results] == [999, 998, 997], [r.error for r in results]
    assert state.head(coins) == head + 3
    # When the third came before the second's counter was used ("too early", nothing ran), the
    # SDK sealed it again under the same counter once the second had run; the gateway's second
    # attempt may also overtake it (it leaves in a message of its own).
    assert state.calls["Execute"] - executed in {3, 4}
    assert admin.counters.last(coins, alice.account) == 4


def test_a_batch_over_the_message_limit_falls_back_to_one_execute_per_command(
    mesh: InProcessMesh, admin: VeilClient, alice: SigningIdentity
) -> None:
    """Four 300 KB records exceed the gateway's 1 MiB request limit as one ExecuteBatch: the
    call is refused whole (nothing ran), and the SDK sends each command as its own Execute."""
    admin.create_instance(
        "records",
        envelope_pb2.InstanceConfig(
            app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE
        ),
    )
    calls = [
        apps_pb2.AppCall(
            vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x" * 300_000))
        )
        for i in range(4)
    ]
    batches = mesh.states[0].calls["ExecuteBatch"]
    results = admin.execute_many("records", calls, alice)
    assert all(not isinstance(r, Exception) and r.accepted for r in results), results
    assert mesh.states[0].calls["ExecuteBatch"] == batches  # the batch never reached the replica
    assert admin.vault("records", alice).get("r3").data == b"x" * 300_000
