"""Start-up recovery: restarts, a moved node, rollback, tampering, keyvault outages, snapshots."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.state import support
from tests.state.conftest import POSTGRES_URL, StoreFactory
from tests.state.support import (
    READY,
    Node,
    TokenSetup,
    copy_database,
    flip_byte,
    keyvault_head,
    replace_database,
    token_instance,
    wait_for_keyvault_head,
)
from veil.dev.loadclient import Account, balance, mint, total_supply, transfer
from veil.enclave.v1 import apps_pb2
from veil.services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from veil.services.state import lifecycle, recovery, startup
from veil.services.state.errors import NotServing
from veil.services.state.host import StateHost
from veil.services.state.runner import spawn_enclave
from veil.services.state.store_postgres import PostgresStore
from veil.services.state.store_sqlite import SqliteStore
from veil.state.v1 import state_pb2

TIMEOUT = 10.0


def run(host: StateHost, account: Account, call: apps_pb2.AppCall) -> int:
    """Execute one command; its log sequence."""
    sealed = account.seal(call)
    response = host.execute(account.instance_id, sealed.command, sealed.request_id, TIMEOUT)
    result = account.open(sealed, response.outcome)
    assert response.outcome.accepted
    assert not result.HasField("error"), result.error
    return response.outcome.sequence


def amount(host: StateHost, account: Account, call: apps_pb2.AppCall) -> int:
    """A token amount read by a query (the account re-reads the enclave's current keys)."""
    account.keys = host.attestation_bundle().keys
    sealed = account.seal(call, counter=0)
    result = account.open(sealed, host.query(account.instance_id, sealed.command, 10).outcome)
    token = result.result.token
    return int(getattr(token, str(token.WhichOneof("method"))).amount)


def traffic(host: StateHost, setup: TokenSetup, transfers: int) -> int:
    """Mint to the first holder and move tokens around; returns the head sequence."""
    alice, bob = setup.accounts
    for account in (setup.issuer, alice, bob):
        account.keys = host.attestation_bundle().keys
    sequence = run(host, setup.issuer, mint(alice.account, 1000))
    for i in range(transfers):
        sender, receiver = (alice, bob) if i % 2 == 0 else (bob, alice)
        sequence = run(host, sender, transfer(receiver.account, 1))
    return sequence


def refused(host: StateHost) -> str:
    step = host.wait_until(READY, 30)
    assert step == lifecycle.FAILED, host.lifecycle.current()
    detail = host.status().detail
    with pytest.raises(NotServing):
        host.list_instances()
    return detail


def test_a_restart_recovers_everything_from_the_sealed_cache(node: Node) -> None:
    first = node.serving()
    setup = token_instance(first)
    head = traffic(first, setup, transfers=5)
    alice, bob = setup.accounts
    sealed = bob.seal(transfer(alice.account, 1))
    answered = first.execute("tokens", sealed.command, sealed.request_id, TIMEOUT)
    stale = alice.seal(transfer(bob.account, 1), counter=alice.counter + 1)  # sealed, never sent
    first.stop()

    second = node.serving()
    assert node.clients[-1].releases == 0  # every key came from the sealed cache
    [instance] = second.list_instances()
    assert instance.head.sequence == head + 1
    assert amount(second, alice, balance()) == 1000
    assert amount(second, bob, balance()) == 0
    assert amount(second, alice, total_supply()) == 1000
    # A retry of a command acknowledged before the restart gets its first answer.
    assert second.execute("tokens", sealed.command, sealed.request_id, TIMEOUT) == answered
    # One sealed to the old enclave and never sent cannot be opened: the client seals it again.
    with pytest.raises(InvalidArgument) as raised:
        second.execute("tokens", stale.command, stale.request_id, TIMEOUT)
    assert raised.value.reason == "COMMAND_UNOPENABLE"
    assert traffic(second, setup, transfers=1) == head + 3  # and the log goes on


def test_a_moved_node_recovers_through_the_keyvault_with_nothing_lost(node: Node) -> None:
    first = node.serving(platform="a")
    setup = token_instance(first)
    head = traffic(first, setup, transfers=4)
    sealed_before = (node.directory / "sealed" / "keys.sealed").read_bytes()
    first.stop()

    moved = node.serving(platform="b")  # another CPU: the sealed cache does not open here
    assert node.clients[-1].releases >= 1
    [instance] = moved.list_instances()
    assert instance.head.sequence == head
    assert amount(moved, setup.accounts[0], balance()) == 1000
    sealed_after = (node.directory / "sealed" / "keys.sealed").read_bytes()
    assert sealed_after != sealed_before  # re-sealed for the new platform
    moved.stop()
    node.serving(platform="b")
    assert node.clients[-1].releases == 0


def test_an_older_database_is_refused_naming_instance_and_sequence(node: Node, tmp_path: Path) -> None:
    host = node.serving()
    setup = token_instance(host)
    traffic(host, setup, transfers=2)
    backup = tmp_path / "backup.db"
    copy_database(node.database, backup)
    head = traffic(host, setup, transfers=3)
    wait_for_keyvault_head(node, "tokens", head)
    host.stop()

    replace_database(node, backup)
    detail = refused(node.host())
    assert "'tokens'" in detail
    assert f"sequence {head}" in detail
    assert "rollback" in detail


@pytest.mark.parametrize(
    ("sequence", "fix_hash", "says"),
    [
        (4, False, "altered"),  # one flipped byte in one entry
        (3, True, "broken chain"),  # with its stored hash made to match: the next entry's link breaks
    ],
)
def test_a_flipped_byte_in_the_log_is_refused(node: Node, sequence: int, fix_hash: bool, says: str) -> None:
    host = node.serving()
    setup = token_instance(host)
    traffic(host, setup, transfers=4)
    host.stop()

    flip_byte(node.database, "tokens", sequence, fix_hash=fix_hash)
    detail = refused(node.host())
    assert "'tokens' at sequence 4" in detail
    assert says in detail


def test_tampering_with_the_newest_entry_is_caught_by_the_enclave(node: Node) -> None:
    host = node.serving()
    setup = token_instance(host)
    head = traffic(host, setup, transfers=2)
    host.stop()

    # The newest entry has no successor to break: the keyvault head (if caught up) or the
    # enclave's authenticated decryption catches it.
    flip_byte(node.database, "tokens", head, fix_hash=True)
    detail = refused(node.host())
    assert f"'tokens' at sequence {head}" in detail


def test_the_keyvault_down_at_start_up_is_retried_and_said(node: Node) -> None:
    first = node.serving()
    setup = token_instance(first)
    head = traffic(first, setup, transfers=1)
    first.stop()
    node.keyvault.stop()

    host = node.host()
    assert host.wait_until({lifecycle.ATTESTING}, 10) == lifecycle.ATTESTING
    for _ in range(100):
        step, detail = host.lifecycle.current()
        if "retry" in detail:
            break
        host.wait_until({lifecycle.SERVING}, 0.05)
    assert step == lifecycle.ATTESTING
    assert "unreachable" in detail
    assert "retry" in detail
    assert host.status().step == lifecycle.ATTESTING

    node.keyvault.start()
    assert host.wait_until(READY, 30) == lifecycle.SERVING
    assert host.list_instances()[0].head.sequence == head


def _keyvault_away_after_traffic(node: Node, *, fast: bool) -> tuple[StateHost, TokenSetup, int]:
    """A serving host with a token instance whose traffic the keyvault confirmed, then the
    keyvault stops; returns the confirmed head."""
    host = node.serving()
    setup = token_instance(host, fast=fast)
    head = traffic(host, setup, transfers=1)
    wait_for_keyvault_head(node, "tokens", head)
    node.keyvault.stop()
    return host, setup, head


def _transfers(host: StateHost, setup: TokenSetup, count: int) -> int:
    """`count` transfers of 1 from the first account to the second; returns the head."""
    alice, bob = setup.accounts
    head = 0
    for _ in range(count):
        head = run(host, alice, transfer(bob.account, 1))
    return head


def test_fast_instances_serve_on_while_the_keyvault_is_away_and_heads_catch_up(node: Node) -> None:
    host, setup, _ = _keyvault_away_after_traffic(node, fast=True)
    head = _transfers(host, setup, 3)
    for _ in range(50):
        if "unreachable" in host.status().detail:
            break
        host.wait_until({lifecycle.FAILED}, 0.05)
    detail = host.status().detail
    assert "unreachable" in detail
    assert "lag" in detail

    node.keyvault.start()
    wait_for_keyvault_head(node, "tokens", head)


def test_strict_instances_answer_nothing_the_keyvault_has_not_confirmed(node: Node) -> None:
    """With the keyvault away a strict command is durable but unanswered; a retry with the same
    request id, once it is back, gets the one answer (the command ran once)."""
    host, setup, head = _keyvault_away_after_traffic(node, fast=False)
    alice, bob = setup.accounts
    sealed = alice.seal(transfer(bob.account, 1))
    with pytest.raises(DeadlineExceeded):
        host.execute("tokens", sealed.command, sealed.request_id, 1.0)
    account = Account(host.attestation_bundle().keys, "tokens", signer=bob.signer)
    query = account.seal(balance(), counter=0)
    with pytest.raises(DeadlineExceeded):  # the state it would read is not confirmed either
        host.query("tokens", query.command, 0.5)
    node.keyvault.start()
    response = host.execute("tokens", sealed.command, sealed.request_id, TIMEOUT)
    assert response.outcome.accepted
    assert response.outcome.sequence == head + 1
    assert not alice.open(sealed, response.outcome).HasField("error")
    assert amount(host, bob, balance()) == 1 + 1
    assert keyvault_head(node, "tokens") >= head + 1


def test_a_database_ahead_of_the_keyvault_is_accepted_and_caught_up(node: Node) -> None:
    host, setup, _ = _keyvault_away_after_traffic(node, fast=True)
    alice, bob = setup.accounts
    head = _transfers(host, setup, 3)
    host.stop()  # committed and acknowledged, but the keyvault never heard of it

    node.keyvault.start()
    restarted = node.serving()
    assert restarted.list_instances()[0].head.sequence == head
    # The restored enclave signs a link from the keyvault head over the entries it never saw.
    wait_for_keyvault_head(node, "tokens", head)
    alice.keys = bob.keys = restarted.attestation_bundle().keys
    head = run(restarted, alice, transfer(bob.account, 1))
    wait_for_keyvault_head(node, "tokens", head)


def test_snapshots_compact_the_log_and_speed_up_recovery(node: Node) -> None:
    host = node.serving(snapshot_every=10)
    setup = token_instance(host)
    head = traffic(host, setup, transfers=24)  # sequences 1..26
    wait_for_keyvault_head(node, "tokens", head)
    traffic_head = run(host, setup.accounts[0], transfer(setup.accounts[1].account, 1))
    host.stop()

    loaded = SqliteStore(node.database).load("tokens")
    assert loaded.snapshot is not None
    assert loaded.snapshot.sequence >= 20
    remaining = SqliteStore(node.database).entries("tokens", after=0)
    assert len(remaining) < traffic_head  # compacted behind the snapshot
    assert host.metrics.snapshots >= 2
    restarted = node.serving(snapshot_every=10)
    assert restarted.list_instances()[0].head.sequence == traffic_head
    assert amount(restarted, setup.accounts[0], total_supply()) == 1000


def test_compaction_keeps_what_the_keyvault_head_still_needs(node: Node) -> None:
    host = node.serving(snapshot_every=5)
    setup = token_instance(host, fast=True)
    confirmed = traffic(host, setup, transfers=1)  # 1..3
    wait_for_keyvault_head(node, "tokens", confirmed)
    node.keyvault.stop()
    head = traffic(host, setup, transfers=8)  # snapshots while the keyvault head stays at 3
    host.stop()
    store = SqliteStore(node.database)
    snapshot = store.load("tokens").snapshot
    assert snapshot is not None
    assert snapshot.sequence > confirmed
    stored = [e.sequence for e in store.entries("tokens", after=0)]
    assert stored[0] == confirmed  # the entry at the keyvault head stays to verify the snapshot

    node.keyvault.start()
    restarted = node.serving(snapshot_every=5)
    assert restarted.list_instances()[0].head.sequence == head


@pytest.mark.postgres
def test_a_restart_recovers_from_postgresql(node: Node) -> None:
    schema = f"veil_state_test_{uuid.uuid4().hex[:16]}"
    stores = [PostgresStore(POSTGRES_URL, schema=schema) for _ in range(2)]
    try:
        first = node.serving(store=stores[0])
        setup = token_instance(first)
        head = traffic(first, setup, transfers=6)
        first.stop()
        second = node.serving(store=stores[1])
        assert second.list_instances()[0].head.sequence == head
        assert amount(second, setup.accounts[0], total_supply()) == 1000
        assert traffic(second, setup, transfers=1) == head + 2
    finally:
        for host in node.hosts:
            host.stop()
        stores[1].drop_schema()
        for store in stores:
            store.close()


def test_a_log_is_restored_in_parts_through_the_runner_process(
    node: Node, open_store: StoreFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Parts of three entries through the real pipe to a runner process, on SQLite and PostgreSQL:
    the restart serves exactly what was acknowledged, says how far the replay got, and the log
    goes on from there."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    monkeypatch.setattr(startup, "PROGRESS_EVERY_S", 0.0)
    first = node.serving(store=open_store(), enclave_factory=spawn_enclave)
    setup = token_instance(first)
    head = traffic(first, setup, transfers=9)  # alice sends 5, bob 4
    first.stop()
    caplog.set_level(logging.INFO, logger=lifecycle.__name__)
    second = node.serving(store=open_store(), enclave_factory=spawn_enclave)
    assert second.list_instances()[0].head.sequence == head
    assert second.metrics.snapshot()["recovered_entries"] == head
    said = [r.getMessage() for r in caplog.records if "entries replayed" in r.getMessage()]
    assert said[-1].endswith(f"(1/1): {head} of {head} entries replayed"), said
    assert amount(second, setup.accounts[0], balance()) == 999
    assert amount(second, setup.accounts[0], total_supply()) == 1000
    assert traffic(second, setup, transfers=1) == head + 2


def test_a_bounded_head_lag_stops_acknowledging_until_the_keyvault_is_back(node: Node) -> None:
    host = node.serving(max_head_lag=3)
    setup = token_instance(host, fast=True)
    head = traffic(host, setup, transfers=1)
    wait_for_keyvault_head(node, "tokens", head)
    node.keyvault.stop()
    alice, bob = setup.accounts
    for _ in range(3):
        run(host, alice, transfer(bob.account, 1))
    sealed = alice.seal(transfer(bob.account, 1))
    with pytest.raises(Unavailable) as raised:
        host.execute("tokens", sealed.command, sealed.request_id, TIMEOUT)
    assert raised.value.reason == "COMMIT_HEAD_LAG"
    node.keyvault.start()
    wait_for_keyvault_head(node, "tokens", head + 3)
    for _ in range(100):  # the host learns of the catch-up from the keyvault's answer
        try:
            host.execute("tokens", sealed.command, sealed.request_id, TIMEOUT)
            break
        except Unavailable:
            host.wait_until({lifecycle.FAILED}, 0.05)
    assert amount(host, bob, balance()) == 1 + 3 + 1


def test_a_graceful_stop_delivers_strict_answers_the_keyvault_confirms_during_it(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Draining flushes the head advancer first, so a strict answer whose head the keyvault
    confirms during the stop is delivered, not failed (found by the second review)."""
    slow = threading.Event()

    class SlowKeyvault(support.CountingKeyvault):
        def advance_commit_head(self, links: Any, token: str, hold_key_version: int = 0) -> Any:
            if slow.is_set():
                time.sleep(0.8)  # a keyvault round trip slower than the drain, within the 2 s flush
            return super().advance_commit_head(links, token, hold_key_version)

    monkeypatch.setattr(support, "CountingKeyvault", SlowKeyvault)
    host = node.serving()
    setup = token_instance(host)
    slow.set()
    sealed = setup.issuer.seal(mint(setup.accounts[0].account, 5))
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(host.execute(setup.instance_id, sealed.command, sealed.request_id, TIMEOUT))
        except Exception as exc:  # the assertion below says which
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the command's batch is committed
        head = host.parts.store.head(setup.instance_id)
        if head is not None and head.sequence >= 2:
            break
        time.sleep(0.01)
    host.stop()
    caller.join(10)
    assert keyvault_head(node, setup.instance_id) == 2
    (answer,) = outcome
    assert isinstance(answer, state_pb2.ExecuteResponse), answer
    assert answer.outcome.accepted
