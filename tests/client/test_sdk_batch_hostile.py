"""An outside review: a hostile host made the Python SDK pay a transfer twice, four ways.

1. A batch that did not finish left sealings in the host's hands under counters the SDK still
   handed to the next new call; the host ran the new call, a held sealing after it, and replayed
   the new call for a genuine "counter used by another command" refusal: the SDK sealed it again.
   Now every sealing raises the high-water mark before it is sent (the new call is sealed above
   the held ones and is `CounterGap` until they are resumed), and a refusal naming a command
   past this call's counter is `OutcomeUnknown`, never a re-seal.
2. A CSV transfer killed mid-batch and run again sealed its rows anew. Now every sealed call is
   kept in `<data_dir>/calls/` before it is sent, and a new process resumes it by request id.
3. A failed attestation while resuming forgot the resumed calls.
4. An answer at another command's index was an IntegrityError that dropped the call: now it is
   ambiguous, and the same bytes are sent again.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import pytest

from tests.gateway.support import InProcessMesh, token_config
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.calls import FileCalls, MemoryCalls
from veil.sdk.client import VeilClient
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import CounterGap, ForeignAnswer, GatewayError, OutcomeUnknown, VeilClientError
from veil.sdk.identity import SigningIdentity, new_identity
from veil.verify.errors import AttestationError

BOB = "b0" * 32


@pytest.fixture
def alice(mesh: InProcessMesh) -> SigningIdentity:
    return new_identity(mesh.data_dir, "alice")


@pytest.fixture
def coins(mesh: InProcessMesh, alice: SigningIdentity) -> str:
    """A token instance whose issuer alice holds 1000 (counter 1 used by the mint)."""
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        admin.token("coins", alice).mint(alice.account, 1000)
    return "coins"


class Down(grpc.RpcError, grpc.Call):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"

    def trailing_metadata(self) -> Any:
        return ()

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class HostileStub:
    """The gateway stub, as a hostile host would answer: `blackhole` (keeps the first batch's
    sealings, answers nothing), `gap` (the first Execute runs, then a held sealing, then the
    Execute replayed under another request id), `no-dedupe` (outer request ids rewritten)."""

    def __init__(self, real: Any) -> None:
        self.real, self.mode, self.executes = real, "blackhole", 0
        self.held: list[gateway_pb2.ExecuteRequest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def ExecuteBatch(self, request: Any, **kw: Any) -> Any:
        if self.mode == "blackhole":
            if not self.held:
                self.held = list(request.commands)
            raise Down()
        return self.real.ExecuteBatch(request, **kw)

    def Execute(self, request: Any, **kw: Any) -> Any:
        if self.mode == "blackhole":
            raise Down()
        self.executes += 1
        if self.mode == "gap" and self.executes == 1:
            self.real.Execute(request, **kw)  # X under its counter
            self.real.Execute(self.held[1], **kw)  # the old batch's held sealing
            replay = gateway_pb2.ExecuteRequest()
            replay.CopyFrom(request)
            replay.request_id = "host-replay"
            return self.real.Execute(replay, **kw)  # a genuine sealed ABORTED
        if self.mode in ("gap", "no-dedupe"):  # the host ignores request-id dedupe
            forwarded = gateway_pb2.ExecuteRequest()
            forwarded.CopyFrom(request)
            forwarded.request_id = f"host-{self.executes}"
            return self.real.Execute(forwarded, **kw)
        return self.real.Execute(request, **kw)


class LoseAllStub(HostileStub):
    """`run-and-lose`: the batch runs, every answer is lost, then nothing gets through;
    `no-dedupe`: batches run under rewritten outer request ids."""

    def ExecuteBatch(self, request: Any, **kw: Any) -> Any:
        if self.mode == "run-and-lose":
            list(self.real.ExecuteBatch(request, **kw))
            self.mode = "blackhole"
            raise Down()
        if self.mode == "blackhole":
            raise Down()
        forwarded = gateway_pb2.ExecuteBatchRequest()
        forwarded.CopyFrom(request)
        for n, command in enumerate(forwarded.commands):
            command.request_id = f"host-b{self.executes}-{n}"
        self.executes += 1
        return self.real.ExecuteBatch(forwarded, **kw)


def _pay(amount: int) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=BOB, amount=amount)))


def _hostile(client: VeilClient, stub_type: type[HostileStub] = HostileStub) -> Any:
    stub = stub_type(client._stub)
    client._stub = stub  # type: ignore[assignment]
    return stub


def _balance(mesh: InProcessMesh, alice: SigningIdentity) -> int:
    with mesh.connect() as honest:
        return honest.token("coins", alice).balance()


def _run_and_lose(client: VeilClient, coins: str, alice: SigningIdentity, ids: list[str]) -> Any:
    """Three 10-coin rows as one batch under `ids`: it runs, every answer is lost (GatewayError),
    then nothing gets through this client's LoseAllStub (returned) until a test sets its mode."""
    stub = _hostile(client, LoseAllStub)
    stub.mode = "run-and-lose"
    results = client.execute_many(coins, [_pay(10)] * 3, alice, request_ids=ids)
    assert all(isinstance(r, GatewayError) for r in results), results
    return stub


def test_a_new_call_after_an_unsettled_batch_is_sealed_above_it_and_never_runs_twice(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Review 1a: the new call takes a counter above the batch's held sealings, so the host's
    gap attack only gets "too early" for it: CounterGap naming the calls to resume. Resumed in
    order (same request ids, the host still rewriting outer ids), each runs exactly once."""
    head = mesh.states[0].head(coins)
    with mesh.connect(timeout=1.5) as client:
        stub = _hostile(client)
        results = client.execute_many(coins, [_pay(1), _pay(2)], alice)
        assert all(isinstance(r, GatewayError) for r in results), results
        batch_ids = [r.request_id for r in results if isinstance(r, GatewayError)]
        assert client.counters.sealed(coins, alice.account) == 3  # marked before anything was sent
        stub.mode = "gap"
        with pytest.raises(CounterGap) as gap:
            client.execute(coins, _pay(100), alice)
        assert gap.value.waiting_for == batch_ids
        assert gap.value.request_id is not None
        # A new batch meanwhile: sealed above both, every command waits too (sent once, kept).
        blocked = client.execute_many(coins, [_pay(5), _pay(6)], alice)
        assert all(isinstance(b, CounterGap) for b in blocked), blocked
        waiting = [*batch_ids, gap.value.request_id]
        assert all(isinstance(b, CounterGap) and b.waiting_for == waiting for b in blocked)
        blocked_ids = [b.request_id for b in blocked if isinstance(b, CounterGap)]
        assert _balance(mesh, alice) == 1000  # nothing ran: every sealing was too early
        # Resume the batch, then the new calls, by their request ids: the same bytes each time.
        resumed = client.execute_many(coins, [_pay(1), _pay(2)], alice, request_ids=batch_ids)
        assert all(not isinstance(r, Exception) and r.accepted for r in resumed), resumed
        again = client.execute(coins, _pay(100), alice, request_id=gap.value.request_id)
        assert again.accepted
        assert client.execute(coins, _pay(100), alice, request_id=gap.value.request_id) is again
        later = client.execute_many(coins, [_pay(5), _pay(6)], alice, request_ids=blocked_ids)
        assert all(not isinstance(r, Exception) and r.accepted for r in later), later
    assert _balance(mesh, alice) == 886  # 1 + 2 + 100 + 5 + 6, each once
    assert mesh.states[0].head(coins) == head + 5


def test_a_refusal_naming_a_later_command_is_outcome_unknown_not_a_reseal(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Review 1b: without the high-water mark (another device, a lost sealed.json) the new call
    takes the held batch's first counter. The host runs it, then a held sealing, then replays it:
    the enclave's genuine refusal names the held sealing under the counter past this call's. That
    proves only that the replay did not run: OutcomeUnknown, never a re-seal (it paid twice)."""
    with mesh.connect(timeout=1.5) as client:
        stub = _hostile(client)
        results = client.execute_many(coins, [_pay(1), _pay(2)], alice)
        assert all(isinstance(r, GatewayError) for r in results), results
        client.counters = MemoryCounters()  # knows counter 1 only: the high-water mark is lost
        client.counters.record(coins, alice.account, 1)
        stub.mode = "gap"
        with pytest.raises(OutcomeUnknown) as unknown:
            client.execute(coins, _pay(100), alice)
        assert not isinstance(unknown.value, CounterGap)
        with pytest.raises(OutcomeUnknown):  # resuming it proves nothing more, and re-seals nothing
            client.execute(coins, _pay(100), alice, request_id=unknown.value.request_id)
    assert _balance(mesh, alice) == 898, "the 100-coin transfer ran twice"


def test_a_rerun_in_a_new_process_with_the_same_request_ids_resumes_and_pays_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Review 2: the first process's batch ran and every answer was lost; the process ends. A new
    one on the same data dir finds the calls in <data_dir>/calls/ and resends the same bytes,
    which the enclave refuses as used (even under rewritten outer request ids)."""
    ids = ["csv-row-1", "csv-row-2", "csv-row-3"]
    with mesh.connect(timeout=1.5) as first_run:
        _run_and_lose(first_run, coins, alice, ids)
    assert _balance(mesh, alice) == 970
    assert all(FileCalls(mesh.data_dir / "calls").get(i) is not None for i in ids)
    with mesh.connect(timeout=3) as second_run:  # the killed process, run again (same data dir)
        stub = _hostile(second_run, LoseAllStub)
        stub.mode = "no-dedupe"
        second_run.execute_many(coins, [_pay(10)] * 3, alice, request_ids=ids)
    assert _balance(mesh, alice) == 970, "the rows were paid again on the rerun"


def test_a_failed_attestation_while_resuming_keeps_the_calls(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Review 3: GetAttestation failing while a batch resumes its calls must not forget them."""
    ids = ["row-1", "row-2", "row-3"]
    with mesh.connect(timeout=1.5) as client:
        stub = _run_and_lose(client, coins, alice, ids)
        client._attestations.clear()  # the token expired
        stub.GetAttestation = lambda *a, **k: (_ for _ in ()).throw(Down())
        with pytest.raises(GatewayError):
            client.execute_many(coins, [_pay(10)] * 3, alice, request_ids=ids)
        del stub.GetAttestation
        stub.mode = "no-dedupe"
        client.execute_many(coins, [_pay(10)] * 3, alice, request_ids=ids)
    assert _balance(mesh, alice) == 970, "rows paid again after the resumed calls were forgotten"


def test_an_attestation_error_after_an_ambiguous_attempt_keeps_the_call(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Review 3, `execute`: the command runs, the host answers with an unsealed refusal (its
    word: ambiguous), and the re-attestation before the next sealing fails. The call stays
    resumable: the same request id later sends the same bytes and gets the first answer."""
    with mesh.connect(timeout=1.5) as client:
        stub = _hostile(client)
        stub.mode = "honest"

        def ran_but_denied(request: Any, **kw: Any) -> Any:
            stub.real.Execute(request, **kw)
            return gateway_pb2.ExecuteResponse(
                outcome=envelope_pb2.CommandOutcome(
                    error=error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT)
                )
            )

        stub.Execute = ran_but_denied
        stub.GetAttestation = lambda *a, **k: gateway_pb2.GetAttestationResponse()  # refused evidence
        with pytest.raises(AttestationError):
            client.execute(coins, _pay(10), alice, request_id="pay-once")
        del stub.Execute, stub.GetAttestation
        opened = client.execute(coins, _pay(10), alice, request_id="pay-once")
        assert opened.accepted
    assert _balance(mesh, alice) == 990, "the call was forgotten and paid twice"


def test_an_answer_at_another_commands_index_is_ambiguous_and_resent(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """Review 4: the host swaps two answers' indexes. Neither opens under its command's response
    key: ambiguous, so each command's same bytes go again under its request id (answered from
    the record), never an IntegrityError that drops the call."""
    head = mesh.states[0].head(coins)
    with mesh.connect() as client:
        stub = _hostile(client)
        stub.mode = "honest"

        def swapped(request: Any, **kw: Any) -> Any:
            items = list(stub.real.ExecuteBatch(request, **kw))
            for item in items:
                if item.index in (0, 1):
                    item.index = 1 - item.index
            return iter(items)

        stub.ExecuteBatch = swapped
        results = client.execute_many(coins, [_pay(1), _pay(2), _pay(3)], alice)
    assert all(not isinstance(r, Exception) and r.accepted for r in results), results
    assert _balance(mesh, alice) == 994
    assert mesh.states[0].head(coins) == head + 3


def test_a_call_refused_before_running_gives_its_counter_back_to_the_next_call(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """The high-water mark comes back down only for the highest sealing, refused by the enclave
    before running (its counter unused, nothing sealed above it): the next call takes it."""
    wrong_app = apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id="r", data=b"x")))
    with mesh.connect() as client:
        refused = client.execute(coins, wrong_app, alice)
        assert not refused.accepted
        assert client.counters.sealed(coins, alice.account) == 1
        assert client.execute(coins, _pay(5), alice).accepted
        assert client.counters.last(coins, alice.account) == 2
        assert not any((mesh.data_dir / "calls").glob("*.json"))  # settled calls leave the store
    assert _balance(mesh, alice) == 995


def test_two_processes_resuming_one_call_take_turns_and_pay_once(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """An outside review: two processes on one data dir resumed the same call at once; each
    rewrote the call's file with only its own sealings, so one never learned of a sealing the
    other made and ran, took the enclave's "counter used by <that sealing>" for another
    command's, and sealed the call under the next counter: paid twice (940). The calls store
    now holds an account's calls for a whole call against other processes (flock), and the
    second process finds the call settled, with its answer."""
    kept: list[Any] = []  # the first sealing's command (every sealing goes under "pay-30")

    def lost(real: Any, request: Any, **kw: Any) -> Any:
        kept.append(request.command)
        raise Down()

    with mesh.connect(timeout=1.0) as first:  # the first sealing is lost: the call is kept
        first._stub = _Scripted(first._stub, lost)  # type: ignore[assignment]
        with pytest.raises(GatewayError):
            first.execute(coins, _pay(30), alice, request_id="pay-30")
    p2_resending = threading.Event()

    def p2_execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.command == kept[0]:  # its resend of the kept bytes, held a while
            p2_resending.set()
            time.sleep(1.0)
            return _hosts_word()
        return real.Execute(request, **kw)

    def p1_execute(real: Any, request: Any, **kw: Any) -> Any:
        if request.command == kept[0]:
            return _hosts_word()
        real.Execute(request, **kw)  # a fresh sealing: it runs, its answer is the host's word
        return _hosts_word()

    answers: list[Any] = []
    with mesh.connect(timeout=3) as p1, mesh.connect(timeout=3) as p2:  # two processes, one data dir
        p1._stub = _Scripted(p1._stub, p1_execute)  # type: ignore[assignment]
        p2._stub = _Scripted(p2._stub, p2_execute)  # type: ignore[assignment]
        worker = threading.Thread(
            target=lambda: answers.append(p2.execute(coins, _pay(30), alice, request_id="pay-30"))
        )
        worker.start()
        assert p2_resending.wait(10)
        from_p1 = p1.execute(coins, _pay(30), alice, request_id="pay-30")  # waits for p2's turn to end
        worker.join(20)
    assert [a.accepted for a in answers] == [True]
    assert from_p1 == answers[0]  # the answer p2 kept, nothing sent
    assert _balance(mesh, alice) == 970


class _Scripted:
    """A gateway stub whose Execute is `execute(real, request, **kw)`."""

    def __init__(self, real: Any, execute: Any) -> None:
        self.real, self._execute = real, execute

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def Execute(self, request: Any, **kw: Any) -> Any:
        return self._execute(self.real, request, **kw)


def _hosts_word() -> gateway_pb2.ExecuteResponse:
    """An unsealed refusal: the host's word, ambiguous to the client."""
    error = error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT, message="x")
    return gateway_pb2.ExecuteResponse(outcome=envelope_pb2.CommandOutcome(error=error))


_STOPPED_HOLDER = """
import os, signal, sys
from pathlib import Path
from veil.sdk.calls import FileCalls
with FileCalls(Path(sys.argv[1])).locked(sys.argv[2], sys.argv[3], 1.0):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_call_waits_a_bounded_time_for_another_process_then_says_so(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """An outside review: a stopped process holding the account's calls (Ctrl-Z on a transfer)
    made every other call on the account hang silently. It now waits four client timeouts, then
    says which lock and that nothing was sent."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_HOLDER, str(mesh.data_dir / "calls"), coins, alice.account],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with (
            mesh.connect(timeout=0.5) as client,
            pytest.raises(VeilClientError, match="nothing was sent") as held,
        ):
            client.execute(coins, _pay(1), alice)
        assert "another process has held this account's calls" in str(held.value)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert _balance(mesh, alice) == 1000


def test_a_rerun_after_a_resealing_ran_never_runs_twice(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity
) -> None:
    """The fourth review of stop 25: a re-sealing went out under a fresh wire id, so when the
    first sealing of "row-7" never ran and its re-sealing did, the mesh kept that answer under an
    id the application never named, and a rerun under "row-7" by a client that lost its records
    paid again (940) once it knew the account's counter. Every sealing now goes under the call's
    id: the rerun gets the mesh's record of the sealing that ran, which it cannot open, and
    nothing runs."""
    dropped: list[Any] = []

    def drop_first(real: Any, request: Any, **kw: Any) -> Any:
        if not dropped:  # never forwarded: the first sealing does not run
            dropped.append(request.command)
            return _hosts_word()
        return real.Execute(request, **kw)

    with mesh.connect(timeout=2.0) as client:  # its counters know the mint's: sealed under 2
        client._stub = _Scripted(client._stub, drop_first)  # type: ignore[assignment]
        assert client.execute(coins, _pay(30), alice, request_id="row-7").accepted
        assert client.counters.last(coins, alice.account) == 2  # the re-sealing ran, under 2
    assert len(dropped) == 1
    sent: list[Any] = []

    def record(real: Any, request: Any, **kw: Any) -> Any:
        sent.append(request)
        return real.Execute(request, **kw)

    with mesh.connect(timeout=2.0, calls=MemoryCalls(), counters=MemoryCounters()) as lost_records:
        assert lost_records.token(coins, alice).balance() == 970  # the enclave's word: counter 3 next
        recording = _Scripted(lost_records._stub, record)
        lost_records._stub = recording  # type: ignore[assignment]
        executed = mesh.states[0].calls["Execute"]
        with pytest.raises(ForeignAnswer, match="does not authenticate"):
            lost_records.execute(coins, _pay(30), alice, request_id="row-7")
        # Answered from the record; then the app's read-only filler used counter 3 up.
        assert mesh.states[0].calls["Execute"] == executed + 2
        assert [r.request_id for r in sent].count("row-7") == 1
        assert lost_records.calls.get("row-7") is None  # nothing of it can run: nothing waits for it
        # The rerun's sealing, replayed by a host under another id, can never run.
        replay = gateway_pb2.ExecuteRequest()
        replay.CopyFrom(sent[0])
        replay.request_id = "host-replay"
        assert not recording.real.Execute(replay, timeout=5).outcome.accepted
        # And the account goes on: the next call is not stuck behind it.
        assert lost_records.execute(coins, _pay(1), alice).accepted
    assert _balance(mesh, alice) == 969
