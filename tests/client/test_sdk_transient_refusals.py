"""An outside review: a hostile host made a genuine *temporary* refusal look final (row 104).

The host squeezed the enclave's memory budget for one command (or, on an OAuth2 instance, moved
its clock past the token's expiry), so the enclave sealed "refused before running" to the client:
RESOURCE_EXHAUSTED. The SDK took that as the call's final answer, lowered its high-water mark and
forgot the call, while the host kept the sealing and ran it once the budget was back: the call
was reported refused though it ran, and an app that retried paid twice (990 instead of 995).

Now the enclave says in the sealed refusal whether that very sealing may still run
(`CommandResult.may_run_later`: budget, clock, a counter ahead), and the SDK takes a refusal as
final only when the sealed bytes decide it and no other sealing of the call may still run. A
temporary one is `NotRunYet`: the call is kept under its request id and resumed, never re-run
as a new call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

import veil.sdk.calls as calls_module
from tests.client.test_sdk_batch_hostile import Down, _balance, _hostile, _pay, _Scripted, alice, coins
from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.calls import MemoryCalls, PendingCall
from veil.sdk.client import VeilClient
from veil.sdk.errors import CounterGap, GatewayError, NotRunYet, OutcomeUnknown
from veil.sdk.identity import SigningIdentity
from veil.sdk.sealing import Opened, SealedRequest, seal_command

__all__ = ["alice", "coins"]  # the fixtures, shared with the batch attacks


class SqueezedEnclave:
    """The state host: while `squeeze` is set, each command reaches the enclave with a 1-byte
    memory budget and the unsealed copy of the refusal is removed, so the client sees only the
    genuine sealed RESOURCE_EXHAUSTED. It keeps every sealing it is given (`seen`); `run` runs
    one, budget restored."""

    def __init__(self, mesh: InProcessMesh, monkeypatch: pytest.MonkeyPatch) -> None:
        self.harness = mesh.states[0].harness
        self.honest = self.harness.execute
        self.squeeze = True
        self.seen: list[envelope_pb2.SealedCommand] = []
        monkeypatch.setattr(self.harness, "execute", self._execute)

    def _execute(self, instance_id: str, commands: list[Any]) -> Any:
        self.seen.extend(commands)
        if not self.squeeze:
            return self.honest(instance_id, commands)
        budget, self.harness.enclave._budget = self.harness.enclave._budget, 1
        try:
            response = self.honest(instance_id, commands)
        finally:
            self.harness.enclave._budget = budget
        for outcome in response.outcomes:
            if outcome.sealed_response:
                outcome.ClearField("error")  # the host's unsealed copy: the client sees the sealed one
        return response

    def run(self, instance_id: str, command: envelope_pb2.SealedCommand) -> None:
        self.squeeze = False
        self.honest(instance_id, [command])


class SqueezingHost(SqueezedEnclave):
    """The state host and the gateway as one adversary: the squeezed enclave, and a gateway that
    keeps every request it is given (`held`), can lose the first one (`drop_first`) and answer the
    next with the host's unsealed "could not open it" (`forge_unopenable`)."""

    def __init__(self, mesh: InProcessMesh, client: VeilClient, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(mesh, monkeypatch)
        self.real = client._stub
        self.drop_first = False
        self.forge_unopenable = False
        self.held: list[gateway_pb2.ExecuteRequest] = []
        client._stub = self  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def Execute(self, request: gateway_pb2.ExecuteRequest, **kw: Any) -> Any:
        kept = gateway_pb2.ExecuteRequest()
        kept.CopyFrom(request)
        self.held.append(kept)
        if self.drop_first:
            self.drop_first = False
            raise Down()  # lost on the way: the client resends the same bytes
        if self.forge_unopenable:
            self.forge_unopenable = False
            return self.real.Execute(_unopenable(request), **kw)
        return self.real.Execute(request, **kw)

    def replay(self, index: int) -> None:
        """Run a held sealing in the enclave, the budget back."""
        self.run(self.held[index].instance_id, self.held[index].command)


def _unopenable(request: gateway_pb2.ExecuteRequest) -> gateway_pb2.ExecuteRequest:
    """The request with its ciphertext spoiled: the genuine path to an unsealed COMMAND_UNOPENABLE."""
    spoiled = gateway_pb2.ExecuteRequest()
    spoiled.CopyFrom(request)
    spoiled.command.ciphertext = bytes(len(spoiled.command.ciphertext))
    spoiled.request_id = request.request_id + "-spoiled"
    return spoiled


def test_a_budget_refusal_is_not_final_and_the_held_sealing_runs_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's attack: the sealed RESOURCE_EXHAUSTED is NotRunYet (the call kept, the mark
    kept), the host runs the held sealing, and resuming the call gets that run's answer."""
    with mesh.connect() as client:
        host = SqueezingHost(mesh, client, monkeypatch)
        with pytest.raises(NotRunYet) as refused:
            client.execute(coins, _pay(5), alice)
        assert refused.value.code == error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED
        assert refused.value.request_id
        assert client.counters.sealed(coins, alice.account) == 2  # the mark is not lowered
        assert client.calls.get(refused.value.request_id) is not None  # nor the call forgotten
        assert _balance(mesh, alice) == 1000

        host.replay(0)  # the budget back, the kept sealing runs
        assert _balance(mesh, alice) == 995
        # The app resumes as the error says: the call ran once, and this is its answer.
        answer = client.execute(coins, _pay(5), alice, request_id=refused.value.request_id)
        assert answer.accepted
        assert answer.result.result.token.transfer.amount == 995
        kept = client.calls.get(refused.value.request_id)
        assert kept is not None
        assert kept.answer == answer  # settled: kept with its answer, as its caller named it
    assert _balance(mesh, alice) == 995  # not 990


def test_a_new_call_behind_a_call_not_run_yet_waits_for_it(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that sends the command again as a new call, while the first is not run yet, gets
    a CounterGap naming it (the new sealing is above the kept one's counter), not a second run."""
    with mesh.connect() as client:
        SqueezingHost(mesh, client, monkeypatch).squeeze = True
        with pytest.raises(NotRunYet) as refused:
            client.execute(coins, _pay(5), alice)
        monkeypatch.undo()  # an honest host from here on
        with pytest.raises(CounterGap) as gap:
            client.execute(coins, _pay(5), alice)
        assert gap.value.waiting_for == [refused.value.request_id]
        assert client.execute(coins, _pay(5), alice, request_id=refused.value.request_id).accepted
        assert client.execute(coins, _pay(5), alice, request_id=gap.value.request_id).accepted
    assert _balance(mesh, alice) == 990  # two calls, each once


def test_a_budget_refusal_of_a_second_sealing_never_settles_the_call(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's second variant: the first send is lost, its resend is answered with the
    host's unsealed "could not open", so the SDK seals the call again under the same counter;
    that sealing gets the squeezed budget's refusal. The call stays unsettled (NotRunYet); the
    host runs the first sealing, and resuming the call gets its answer: one transfer of 5."""
    with mesh.connect() as client:
        host = SqueezingHost(mesh, client, monkeypatch)
        host.drop_first = True
        host.forge_unopenable = True
        with pytest.raises(NotRunYet) as refused:
            client.execute(coins, _pay(5), alice)
        kept = client.calls.get(str(refused.value.request_id))
        assert kept is not None
        assert len(kept.sealings) == 2
        assert _balance(mesh, alice) == 1000
        host.replay(0)  # the first sealing, which the client never saw answered
        assert _balance(mesh, alice) == 995
        answer = client.execute(coins, _pay(5), alice, request_id=refused.value.request_id)
        assert answer.accepted
        assert answer.sequence > 0
    assert _balance(mesh, alice) == 995


def test_a_temporary_refusal_resumed_with_the_budget_back_runs_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an honest host whose budget was only short for a while, resuming the kept call sends
    its very sealing again first (the mesh may answer it from its records: the same refusal), then
    one fresh sealing under the same counter, and the call runs once."""
    with mesh.connect() as client:
        host = SqueezingHost(mesh, client, monkeypatch)
        with pytest.raises(NotRunYet) as refused:
            client.execute(coins, _pay(5), alice)
        host.squeeze = False
        answer = client.execute(coins, _pay(5), alice, request_id=refused.value.request_id)
        assert answer.accepted
        assert host.held[1].command == host.held[0].command  # the same bytes first
        assert len({r.command.ciphertext for r in host.held}) <= 2
    assert _balance(mesh, alice) == 995


def test_a_final_refusal_of_a_second_sealing_leaves_the_first_to_settle(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal the sealed bytes decide proves only that *that* sealing never runs. With an
    earlier sealing of the call still in the host's hands (its send lost, its resend answered
    with the host's "could not open"), the call is OutcomeUnknown, kept with the earlier sealing
    only; resuming it settles that one."""
    wrong_app = _pay(5)
    wrong_app.ClearField("token")
    wrong_app.vault.get.record_id = "r"  # a vault call, on a token instance: INVALID_ARGUMENT
    with mesh.connect() as client:
        host = SqueezingHost(mesh, client, monkeypatch)
        host.squeeze = False
        host.drop_first = True
        host.forge_unopenable = True
        with pytest.raises(OutcomeUnknown) as unknown:
            client.execute(coins, wrong_app, alice)
        assert not isinstance(unknown.value, NotRunYet)
        kept = client.calls.get(str(unknown.value.request_id))
        assert kept is not None
        assert [s.command for s, _ in kept.sealings] == [host.held[0].command]
        refused = client.execute(coins, wrong_app, alice, request_id=unknown.value.request_id)
        assert not refused.accepted  # every sealing refused for good: now the call is
        assert not client.calls.pending(coins, alice.account)
        assert client.counters.sealed(coins, alice.account) == 1  # its counter given back


def test_a_batch_judges_the_sealing_it_sent_and_drops_only_that_one(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """An outside review: resuming a call with two sealings through `execute_many`, the batch
    sent and judged the first, but the SDK took the answer as the last one's: a final refusal of
    the first dropped the second, which could still run. Here the first sealing carries a proof
    the enclave refuses for good (a signature by another key) and the second a good one: the
    call keeps the second, and resuming it runs it once."""
    call = _pay(5)
    with mesh.connect() as client:
        attestation = client.attest(coins)
        keys, scheme = attestation.keys, client._scheme(attestation, coins)
        other = ed25519.Ed25519PrivateKey.generate()

        def sealing(identity: Any, request_id: str) -> SealedRequest:
            return seal_command(
                keys, instance_id=coins, scheme=scheme, identity=identity, call=call, counter=2,
                request_id=request_id,
            )  # fmt: skip

        forged = SimpleNamespace(
            account=alice.account,
            bearer=lambda: None,
            proof=lambda scheme, signed: _signed_by(alice.proof(scheme, signed), other, signed),
        )
        refused, good = sealing(forged, "two-sealings"), sealing(alice, "two-sealings-2")
        client.counters.seal(coins, alice.account, 2)
        client.calls.put(
            PendingCall(
                coins, "two-sealings", 2, call.SerializeToString(deterministic=True),
                [(refused, keys.signing_public_key), (good, keys.signing_public_key)],
                ambiguous=True, account=alice.account,
            )
        )  # fmt: skip
        (result,) = client.execute_many(coins, [call], alice, request_ids=["two-sealings"])
        assert isinstance(result, OutcomeUnknown), result
        assert not isinstance(result, NotRunYet)
        kept = client.calls.get("two-sealings")
        assert kept is not None
        assert [s.command for s, _ in kept.sealings] == [good.command]
        assert client.execute(coins, call, alice, request_id="two-sealings").accepted
    assert _balance(mesh, alice) == 995


def _signed_by(
    proof: command_pb2.AuthProof, key: ed25519.Ed25519PrivateKey, signed: bytes
) -> command_pb2.AuthProof:
    proof.signature.signature = key.sign(signed)
    return proof


def test_the_receipt_stream_yields_commits_only_and_never_hides_a_later_commit(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside review: WatchReceipts yielded any outcome that opened under the call's key, a
    sealed "not run yet" too, and each request id once: a gateway that published the refusal
    first hid the commit of the same sealing. The stream yields commits only."""
    with mesh.connect() as client:
        host = SqueezingHost(mesh, client, monkeypatch)
        answers: dict[str, Any] = {}
        execute = host.real.Execute

        def recording(request: gateway_pb2.ExecuteRequest, **kw: Any) -> Any:
            reply = execute(request, **kw)
            answers[request.request_id] = reply.outcome
            return reply

        monkeypatch.setattr(host.real, "Execute", recording)
        with pytest.raises(NotRunYet) as refused:
            client.execute(coins, _pay(5), alice)
        request_id = str(refused.value.request_id)
        host.squeeze = False
        (commit,) = host.honest(coins, [host.held[0].command]).outcomes  # the kept sealing runs
        assert commit.accepted
        published = [
            gateway_pb2.WatchReceiptsResponse(request_id=request_id, outcome=answers[request_id]),
            gateway_pb2.WatchReceiptsResponse(request_id=request_id, outcome=commit),
        ]
        host.WatchReceipts = lambda request, **kw: iter(published)  # type: ignore[attr-defined]  # the fan-out
        seen = list(client.watch_receipts(coins, identity=alice))
    assert [(o.request_id, o.accepted) for o in seen] == [(request_id, True)]


_WRONG_APP = apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id="r", data=b"x")))


def test_a_crash_before_the_gap_filler_is_healed_by_the_next_call(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside review: a batch call refused for good leaves its counter unused below the
    batch's later sealings; the filler that uses it up ran once, in memory, so a crash before
    it wedged the account (every later call too early, naming nothing that could fix it). Now
    any fresh sealing answered "too early" for a counter no kept call may use fills it."""

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the process dies here

    with mesh.connect() as first:
        monkeypatch.setattr(VeilClient, "_fill_gap", crash)
        with pytest.raises(KeyboardInterrupt):
            first.execute_many(coins, [_pay(5), _WRONG_APP, _pay(7)], alice)
        monkeypatch.undo()
    with mesh.connect() as later:
        (kept,) = later.calls.pending(coins, alice.account)  # the 7, under counter 4
        assert kept.counter == 4
        assert later.execute(coins, _pay(7), alice, request_id=kept.request_id).accepted
        assert later.execute(coins, _pay(1), alice).accepted
        assert not later.calls.pending(coins, alice.account)
    assert _balance(mesh, alice) == 987


def test_an_attestation_failure_at_fill_time_loses_no_answer(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """The same review: the host held a batch's answers until the attestation expired, then
    failed GetAttestation, so the filler's attestation raised out of the batch: the accepted
    transfer's answer and the refusal were never returned. Now the filler just does not run: the
    answers are returned, the later call names its request id, and resuming it fills the gap."""
    with mesh.connect(timeout=1.0) as client:
        stub = _hostile(client)
        stub.mode = "honest"
        real_batch = stub.real.ExecuteBatch

        def held_until_expiry(request: Any, **kw: Any) -> Any:
            items = list(real_batch(request, **kw))
            client._attestations.clear()  # the attestation token expired meanwhile
            stub.GetAttestation = lambda *a, **k: (_ for _ in ()).throw(Down())
            return iter(items)

        stub.ExecuteBatch = held_until_expiry
        paid, refused, later = client.execute_many(coins, [_pay(5), _WRONG_APP, _pay(7)], alice)
        assert isinstance(paid, Opened)
        assert paid.accepted
        assert isinstance(refused, Opened)
        assert not refused.accepted
        assert isinstance(later, GatewayError)
        assert later.request_id
        del stub.GetAttestation, stub.ExecuteBatch
        assert client.execute(coins, _pay(7), alice, request_id=later.request_id).accepted
    assert _balance(mesh, alice) == 988


def test_settled_calls_never_push_an_unsettled_one_out_of_memory(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same review: with named calls kept after they settle, 10,000 of them pushed an older
    unsettled call out of `MemoryCalls`; resuming its id then sealed it anew under another
    counter while the old sealing had run. Only settled calls are ever dropped."""
    monkeypatch.setattr(calls_module, "_MEMORY_LIMIT", 3)
    with mesh.connect(timeout=1.0, calls=MemoryCalls()) as client:
        real = client._stub

        def run_and_lose(stub: Any, request: Any, **kw: Any) -> Any:
            if request.request_id == "pay-30":
                stub.Execute(request, **kw)  # it runs; the answer is lost
            raise Down()

        client._stub = _Scripted(real, run_and_lose)  # type: ignore[assignment]
        with pytest.raises(GatewayError):
            client.execute(coins, _pay(30), alice, request_id="pay-30")
        client._stub = real
        for n in range(4):
            assert client.execute(coins, _pay(1), alice, request_id=f"named-{n}").accepted
        assert client.calls.get("pay-30") is not None
        assert client.execute(coins, _pay(30), alice, request_id="pay-30").accepted  # its one run
    assert _balance(mesh, alice) == 1000 - 30 - 4
