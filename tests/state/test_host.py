"""The state host end to end in one process: real enclave (in-process), real keyvault (gRPC), SQLite."""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.state.support import GatedStore, Node, token_instance
from veil.dev.loadclient import Account, balance, mint, total_supply, transfer, vault_config, vault_put
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2
from veil.services.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from veil.services.state import lifecycle
from veil.services.state.errors import NotServing
from veil.services.state.host import StateHost
from veil.services.state.store_sqlite import SqliteStore
from veil.state.v1 import state_pb2

TIMEOUT = 10.0


def run(
    host: StateHost, account: Account, call: apps_pb2.AppCall, request_id: str | None = None
) -> tuple[state_pb2.ExecuteResponse, command_pb2.CommandResult]:
    """Execute one command; the response and the opened result."""
    sealed = account.seal(call, request_id=request_id)
    response = host.execute(account.instance_id, sealed.command, sealed.request_id, TIMEOUT)
    return response, account.open(sealed, response.outcome)


def read(host: StateHost, account: Account, call: apps_pb2.AppCall) -> int:
    """A token amount read by a query."""
    sealed = account.seal(call, counter=0)
    response = host.query(account.instance_id, sealed.command, 10)
    result = account.open(sealed, response.outcome)
    assert not result.HasField("error"), result.error
    token = result.result.token
    return int(getattr(token, str(token.WhichOneof("method"))).amount)


def test_a_host_starts_serves_and_counts(node: Node) -> None:
    host = node.serving()
    assert host.lifecycle.current()[0] == lifecycle.SERVING
    setup = token_instance(host)
    alice, bob = setup.accounts
    _, minted = run(host, setup.issuer, mint(alice.account, 100))
    assert minted.result.token.mint.amount == 100
    response, moved = run(host, alice, transfer(bob.account, 30))
    assert response.outcome.accepted
    assert moved.result.token.transfer.amount == 70
    assert read(host, bob, balance()) == 30
    assert read(host, alice, total_supply()) == 100
    status = host.status()
    assert status.step == lifecycle.SERVING
    assert status.commands == 2
    assert status.commits == 2
    assert status.ecalls > 0
    assert 0 < status.memory_used_bytes < status.memory_budget_bytes
    [instance] = host.list_instances()
    assert instance.instance_id == "tokens"
    assert instance.head.sequence == 3  # genesis + 2 commands


def vault(host: StateHost, instance_id: str = "vault", users: int = 1) -> list[Account]:
    """A vault instance (anonymous accounts) and `users` accounts on it."""
    keys = host.attestation_bundle().keys
    host.create_instance(instance_id, vault_config(), request_id=f"create-{instance_id}", timeout=10)
    return [Account(keys, instance_id, name=f"user-{i}") for i in range(users)]


def test_concurrent_commands_share_few_ecalls_and_commits(node: Node) -> None:
    host = node.serving()
    accounts = vault(host, users=64)
    before = host.metrics.snapshot()
    barrier = threading.Barrier(len(accounts))

    def put(account: Account) -> bool:
        barrier.wait()
        response, result = run(host, account, vault_put("note", b"hello"))
        return response.outcome.accepted and not result.HasField("error")

    with ThreadPoolExecutor(len(accounts)) as pool:
        assert all(pool.map(put, accounts))
    after = host.metrics.snapshot()
    commits = after["commits"] - before["commits"]
    ecalls = after["execute_ecalls"] - before["execute_ecalls"]
    assert after["commands"] - before["commands"] == 64
    assert commits <= 16, f"{commits} commits for 64 concurrent commands"
    assert ecalls == commits  # one instance: one ExecuteBatch per committed batch
    assert len(SqliteStore(node.database).load("vault").entries) == 65


def _live_futures() -> int:
    gc.collect()
    return sum(isinstance(o, concurrent.futures.Future) for o in gc.get_objects())


def test_answers_once_delivered_are_not_kept_alive(node: Node) -> None:
    """A strict instance's answers wait on hold keys; once delivered, nothing of them may stay
    (the released keys' futures kept every answer of their batch: the heap grew without end
    under load, and its full collections were the p99 tail)."""
    host = node.serving()
    accounts = vault(host, users=16)

    def round_of_puts(number: int) -> None:
        with ThreadPoolExecutor(len(accounts)) as pool:
            answers = list(pool.map(lambda a: run(host, a, vault_put(f"n{number}", b"x"))[0], accounts))
        assert all(answer.outcome.accepted for answer in answers)

    round_of_puts(0)
    after_one = _live_futures()
    for number in range(1, 8):
        round_of_puts(number)
    # The batch worker's locals hold its last batch (two futures a command) until the next one;
    # keeping delivered answers would add two a command of every round (7 x 32 here).
    assert _live_futures() - after_one <= 2 * len(accounts), "futures of delivered answers are kept"


def _gated_vault(node: Node) -> tuple[StateHost, GatedStore, SqliteStore, Account]:
    """A host committing through a store the test can hold, a second view of the same database,
    and one vault account."""
    gated = GatedStore(node.database)
    inner = SqliteStore(node.database)
    node.stores += [gated, inner]
    host = node.serving(store=gated)
    [account] = vault(host)
    return host, gated, inner, account


def test_an_execute_is_answered_only_after_its_commit(node: Node) -> None:
    host, gated, inner, account = _gated_vault(node)
    gated.gate.clear()
    gated.entered.clear()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run, host, account, vault_put("note", b"x"))
        assert gated.entered.wait(5)
        time.sleep(0.1)
        assert not pending.done()  # executed in the enclave, not yet durable: no answer
        assert len(inner.load("vault").entries) == 1
        gated.gate.set()
        response, _ = pending.result(5)
    assert response.outcome.accepted
    assert [e.sequence for e in inner.load("vault").entries] == [1, 2]


def test_a_retried_request_id_gets_the_first_answer(node: Node) -> None:
    host = node.serving()
    [account] = vault(host)
    sealed = account.seal(vault_put("note", b"once"))
    first = host.execute("vault", sealed.command, sealed.request_id, TIMEOUT)
    again = host.execute("vault", sealed.command, sealed.request_id, TIMEOUT)
    assert again == first
    assert account.open(sealed, again.outcome).result.vault.put.created
    assert len(SqliteStore(node.database).load("vault").entries) == 2


def test_concurrent_duplicates_of_a_request_run_once(node: Node) -> None:
    host, gated, inner, account = _gated_vault(node)
    sealed = account.seal(vault_put("note", b"once"))
    gated.gate.clear()
    with ThreadPoolExecutor(5) as pool:
        answers = [
            pool.submit(host.execute, "vault", sealed.command, sealed.request_id, TIMEOUT) for _ in range(5)
        ]
        time.sleep(0.1)
        gated.gate.set()
        responses = [a.result(5) for a in answers]
    assert all(r == responses[0] for r in responses)
    assert responses[0].outcome.accepted
    assert len(inner.load("vault").entries) == 2


def test_a_refused_command_is_not_remembered(node: Node) -> None:
    host = node.serving()
    [account] = vault(host)
    sealed = account.seal(vault_put("note", b"x"), counter=7)  # not the next counter
    response = host.execute("vault", sealed.command, sealed.request_id, TIMEOUT)
    assert not response.outcome.accepted
    assert account.open(sealed, response.outcome).HasField("error")
    assert SqliteStore(node.database).get_response("vault", sealed.request_id) is None


def test_creating_an_instance_is_idempotent_and_checked(node: Node) -> None:
    host = node.serving()
    vault(host)
    again, descriptor = host.create_instance("vault", vault_config(), request_id="retry", timeout=10)
    assert again.head.sequence == 1
    assert descriptor.config == vault_config().SerializeToString(deterministic=True)
    other = vault_config()
    other.auth_scheme = envelope_pb2.AUTH_SCHEME_SIGNATURE
    with pytest.raises(AlreadyExists):
        host.create_instance("vault", other, request_id="other", timeout=10)
    with pytest.raises(InvalidArgument):
        host.create_instance("Not_Valid", vault_config(), request_id="bad", timeout=10)
    account = Account(host.attestation_bundle().keys, "missing", name="u")
    sealed = account.seal(vault_put("a", b"b"))
    with pytest.raises(NotFound):
        host.execute("missing", sealed.command, sealed.request_id, TIMEOUT)


def test_an_instance_the_keyvault_knows_is_not_created_again_on_an_empty_database(
    node: Node, tmp_path: Path
) -> None:
    vault(node.serving())
    other_dir = tmp_path / "other-node"
    other_dir.mkdir()
    fresh = Node(node.base, node.pki_dir, other_dir, node.keyvault)
    try:
        host = fresh.serving()
        with pytest.raises(AlreadyExists, match="commit head"):
            host.create_instance("vault", vault_config(), request_id="again", timeout=10)
    finally:
        fresh.stop_all()


def test_the_memory_budget_refusal_reaches_the_caller(node: Node) -> None:
    host = node.serving(enclave_memory_mb=1)
    [account] = vault(host)
    blob = bytes(300 * 1024)
    for i in range(3):
        response, result = run(host, account, vault_put(f"r{i}", blob))
        assert response.outcome.accepted
        assert not result.HasField("error")
    sealed = account.seal(vault_put("r3", blob))
    with pytest.raises(ResourceExhausted, match="memory budget"):
        host.execute("vault", sealed.command, sealed.request_id, TIMEOUT)
    status = host.status()
    assert status.memory_budget_bytes == 1024 * 1024
    assert 900 * 1024 < status.memory_used_bytes <= 1024 * 1024
    account.counter -= 1  # the refused command consumed nothing
    response, result = run(host, account, vault_put("r0", b"small"))  # replacing shrinks: fits
    assert response.outcome.accepted


def test_a_failed_commit_rebuilds_the_enclave_from_the_database(node: Node) -> None:
    gated = GatedStore(node.database)
    node.stores.append(gated)
    host = node.serving(store=gated)
    [account] = vault(host)
    gated.failures = 3  # every attempt of the next commit fails
    with pytest.raises(NotServing):
        run(host, account, vault_put("lost", b"x"))
    assert host.wait_until({lifecycle.SERVING}, 30) == lifecycle.SERVING
    # The enclave had applied the command; it was rebuilt from the database, which never had
    # it, so the same counter is free again and the first command is not half-applied.
    account.counter -= 1
    account.keys = host.attestation_bundle().keys
    response, result = run(host, account, vault_put("kept", b"y"))
    assert response.outcome.accepted
    assert response.outcome.sequence == 2
    assert not result.HasField("error")


def test_a_transient_commit_error_is_retried(node: Node) -> None:
    gated = GatedStore(node.database)
    node.stores.append(gated)
    host = node.serving(store=gated)
    [account] = vault(host)
    gated.failures = 1
    response, _ = run(host, account, vault_put("note", b"x"))
    assert response.outcome.accepted
    assert host.lifecycle.current()[0] == lifecycle.SERVING


def test_a_database_away_at_start_up_is_retried_and_said(node: Node) -> None:
    gated = GatedStore(node.database)
    node.stores.append(gated)
    gated.failures = 3
    host = node.host(store=gated)
    details = []
    while (step := host.wait_until({lifecycle.SERVING}, 0.02)) is None:
        details.append(host.lifecycle.current()[1])
    assert step == lifecycle.SERVING
    assert any("database is unavailable" in d and "retry" in d for d in details), details
