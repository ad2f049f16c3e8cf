"""A keyvault confirmation that arrives while a batch is being processed rides into the enclave
in the same crossing as the next batch (one crossing instead of two): it releases the answers it
held, the batch runs and is answered; a refused one is handled as alone (the replica stops) and
the commands that crossed with it get a retryable error, never a wrong answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from tests.state.support import GatedStore, Node
from veil.dev.loadclient import Account, vault_config, vault_put
from veil.enclave.v1 import envelope_pb2
from veil.services.state import lifecycle
from veil.services.state.errors import NotServing
from veil.services.state.host import StateHost
from veil.services.state.startup import Runtime
from veil.state.v1 import state_pb2

TIMEOUT = 10.0


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _runtime(host: StateHost) -> Runtime:
    runtime = host._runtime
    assert runtime is not None
    return runtime


def _put(host: StateHost, account: Account, note: str) -> tuple[object, Future[state_pb2.ExecuteResponse]]:
    sealed = account.seal(vault_put(note, b"x"))
    answer = host.enqueue("vault", sealed.command, sealed.request_id)
    assert isinstance(answer, Future)
    return sealed, answer


def _served(node: Node) -> tuple[StateHost, GatedStore, list[Account]]:
    gated = GatedStore(node.database)
    node.stores.append(gated)
    host = node.serving(store=gated)
    keys = host.attestation_bundle().keys
    host.create_instance("vault", vault_config(), request_id="create-vault", timeout=TIMEOUT)
    return host, gated, [Account(keys, "vault", name=f"user-{i}") for i in range(3)]


def test_a_confirmation_rides_with_the_next_batch_releases_its_answers_and_the_batch_runs(
    node: Node,
) -> None:
    host, gated, (alice, bob, carol) = _served(node)
    runtime = _runtime(host)
    keyvault = host.parts.keyvault
    advance = keyvault.advance_commit_head
    advancing = threading.Event()
    advancing.set()

    def slow_advance(links: Sequence[envelope_pb2.CommitLink], token: str) -> envelope_pb2.HeadConfirmation:
        advancing.wait(TIMEOUT)
        return advance(links, token)

    keyvault.advance_commit_head = slow_advance  # type: ignore[method-assign]
    advancing.clear()  # alice's head reaches the keyvault only when the test says
    a_sealed, a_answer = _put(host, alice, "a")
    _wait(lambda: runtime.advancer.lag("vault") > 0, "alice's batch committed")
    gated.gate.clear()  # bob's batch: executed, its commit held (the batcher is busy)
    gated.entered.clear()
    b_sealed, b_answer = _put(host, bob, "b")
    assert gated.entered.wait(TIMEOUT)
    before = host.metrics.snapshot()
    crossings = host.status().ecalls
    advancing.set()  # alice's confirmation arrives while the batcher is busy: it waits to ride
    _wait(lambda: runtime.confirmations.waiting == 1, "the confirmation waits for a batch")
    assert not a_answer.done()
    c_sealed, c_answer = _put(host, carol, "c")  # queued: the batch that carries it
    gated.gate.set()
    for account, sealed, answer in (
        (alice, a_sealed, a_answer),
        (bob, b_sealed, b_answer),
        (carol, c_sealed, c_answer),
    ):
        response = answer.result(TIMEOUT)
        assert response.outcome.accepted
        assert account.open(sealed, response.outcome).result.vault.put.created  # type: ignore[arg-type]
    after = host.metrics.snapshot()
    assert after["carried_confirmations"] - before["carried_confirmations"] >= 1
    assert after["execute_ecalls"] - before["execute_ecalls"] == 1  # carol's batch
    # Carol's ExecuteBatch and alice's ConfirmHead were one crossing; then the confirmations of
    # bob's and carol's heads (and GetStatus).
    assert host.status().ecalls - crossings <= 1 + 2 + 1
    assert host.lifecycle.current()[0] == lifecycle.SERVING


def test_a_refused_confirmation_that_rode_stops_the_replica_and_its_batch_gets_a_retryable_error(
    node: Node,
) -> None:
    host, gated, (alice, bob, _) = _served(node)
    runtime = _runtime(host)
    assert runtime.batcher is not None
    _, done = _put(host, alice, "a")
    assert done.result(TIMEOUT).outcome.accepted
    gated.gate.clear()  # bob's batch is busy committing when the forged confirmation arrives
    gated.entered.clear()
    b_sealed, b_answer = _put(host, bob, "b")
    assert gated.entered.wait(TIMEOUT)
    head = runtime.instances["vault"].head
    forged = envelope_pb2.HeadConfirmation(
        instance_id="vault",
        head=head,
        signature=bytes(64),
        enclave_signing_public_key=runtime.keys.signing_public_key,
    )
    assert runtime.confirmations.add(forged, runtime.batcher.join_next)
    c_sealed, c_answer = _put(host, alice, "c")
    gated.gate.set()
    assert host.wait_until({lifecycle.FAILED}, TIMEOUT) == lifecycle.FAILED
    assert "refused the keyvault's head" in host.lifecycle.current()[1]
    assert host.metrics.snapshot()["carried_confirmations"] >= 1
    # Each command gets its right answer (the genuine confirmation of its head may still have
    # crossed before the replica stopped) or a retryable error; never a wrong answer.
    for account, sealed, answer in ((bob, b_sealed, b_answer), (alice, c_sealed, c_answer)):
        error = answer.exception(TIMEOUT)
        if error is None:
            response = answer.result(0)
            assert response.outcome.accepted
            assert account.open(sealed, response.outcome).result.vault.put.created  # type: ignore[arg-type]
        else:
            assert isinstance(error, NotServing), error  # UNAVAILABLE: retry, same request id
