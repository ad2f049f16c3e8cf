"""Outside review (second): RestoreRequest.abandon, the per-instance memory limit, and the host's
LogMoved retry, against a real in-process enclave played by a hostile host.

Each test documents what held; a test that showed a break says "Was a break" and asserts the secure
behaviour (so it fails on the code the review read).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import (
    NOW_MS,
    Harness,
    config,
    memory_used,
    observed,
    open_part,
    refused,
    vault_put,
)
from tests.state.support import MemoryLog
from veil.enclave import wire
from veil.enclave.v1 import ecall_pb2, envelope_pb2, error_pb2
from veil.services.state import recovery
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost, EnclaveUnavailableError
from veil.services.state.errors import RecoveryRefused
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.startup import Startup
from veil.services.state.store import InstanceRecord, StoredEntry, StoredSnapshot

ENTRIES = 9
BUDGET = 8192
INTERNAL = error_pb2.ECALL_ERROR_CODE_INTERNAL


# --- 1. abandon ------------------------------------------------------------------------------------


def test_abandon_with_every_other_field_set_drops_the_open_restore_and_does_nothing_else(
    logged: Harness,
) -> None:
    """Held: abandon carrying entries, a fresh statement, a snapshot, `continues` and `more` drops
    the open restore of its id and nothing else: the enclave is as if it was never opened, the
    statement's challenge is not used up (the same statement then restores), and a continuation
    of the abandoned restore is refused. (After the review, abandon names the instance: another
    id's abandon leaves the open restore as it is.)"""
    log = logged.log["v"]
    whole = logged.restarted()
    whole.restore("v", log)
    new = logged.restarted()
    before = observed(new)
    open_part(new, "v", log[:4])
    assert memory_used(new) > 0
    statement = new.statement("v")
    other = ecall_pb2.RestoreRequest(abandon=True, instance_id="other")
    assert new.host.call("Restore", other, ecall_pb2.RestoreResponse) == ecall_pb2.RestoreResponse()
    assert memory_used(new) > 0
    abandon = ecall_pb2.RestoreRequest(
        abandon=True,
        instance_id="v",
        entries=[e.SerializeToString() for e in log[4:]],
        statement=statement,
        snapshot=envelope_pb2.EncryptedSnapshot(instance_id="v"),
        host_time_unix_ms=NOW_MS,
        continues=True,
        more=True,
    )
    assert new.host.call("Restore", abandon, ecall_pb2.RestoreResponse) == ecall_pb2.RestoreResponse()
    assert observed(new) == before
    said = refused(lambda: new.host.continue_restore("v", log[4:]))
    assert said == "FAILED_PRECONDITION: no restore of this instance is open to continue"
    assert observed(new) == before
    # The challenge the abandon carried a statement for is still the current one.
    new.host.restore("v", log, statement=statement, host_time_unix_ms=NOW_MS)
    assert new.enclave.state_digest() == whole.enclave.state_digest()


def test_abandon_never_touches_a_loaded_instance_or_keys(logged: Harness) -> None:
    """Held: abandon with nothing open (or with the id of a loaded instance) changes nothing;
    the loaded instance still executes."""
    new = logged.restarted()
    new.restore("v", logged.log["v"])
    before = observed(new)
    new.host.abandon_restore("v")
    new.host.call(
        "Restore", ecall_pb2.RestoreRequest(abandon=True, instance_id="v"), ecall_pb2.RestoreResponse
    )
    assert observed(new) == before
    response = new.host.execute_batch(
        "v", [new.client("v", account="bob").seal(vault_put("z", 4)).command], NOW_MS
    )
    assert response.outcomes[0].accepted


def test_abandon_before_initialize_is_refused(make_enclave: MakeEnclave) -> None:
    """Held: abandon is a Restore; an enclave not initialized refuses it like any other call."""
    from veil.enclave.dispatcher import Dispatcher

    host = EnclaveHost.from_dispatcher(Dispatcher(make_enclave()))
    said = refused(lambda: host.abandon_restore("v"))
    assert said.startswith("FAILED_PRECONDITION: enclave not initialized")


def test_abandon_then_create_of_a_registered_id_is_still_refused(logged: Harness) -> None:
    """Held: abandon lifts the "a restore of this instance is open" refusal of a create, but the
    keyvault's statement for a registered id still refuses it (as without any restore)."""
    new = logged.restarted()
    open_part(new, "v", logged.log["v"][:4])
    said = refused(lambda: new.create_raw("v", config()))
    assert said.startswith("FAILED_PRECONDITION: a restore of this instance is open")
    new.host.abandon_restore("v")
    said = refused(lambda: new.create_raw("v", config()))
    assert said.startswith("ALREADY_EXISTS: the keyvault holds this instance")
    assert not new.host.get_status().instances


def test_a_whole_restore_sent_while_one_is_open_replaces_it_and_the_old_one_cannot_continue(
    logged: Harness,
) -> None:
    """Held (the `instance_id in self._instances` check _finish_restore no longer makes): the
    only way to load the id being restored is a new first part, which drops the open restore,
    so a late continuation is refused and the loaded instance is never replaced."""
    log = logged.log["v"]
    whole = logged.restarted()
    whole.restore("v", log)
    new = logged.restarted()
    open_part(new, "v", log[:4])
    new.restore("v", log)
    loaded = observed(new)
    for later in (log[4:], []):
        said = refused(partial_continue(new, later))
        assert said.startswith("FAILED_PRECONDITION: no restore of this instance is open")
    _open_again = lambda: open_part(new, "v", log[:4])  # noqa: E731
    assert refused(_open_again).startswith("ALREADY_EXISTS")
    assert observed(new) == loaded
    assert new.enclave.state_digest() == whole.enclave.state_digest()


def partial_continue(new: Harness, entries: list[envelope_pb2.LogEntry]) -> Callable[[], object]:
    return lambda: new.host.continue_restore("v", entries)


# --- 2. the memory limit in every interleaving ---------------------------------------------------------


def _unregistered_log(harness: Harness, instance_id: str, sizes: list[int]) -> list[envelope_pb2.LogEntry]:
    """A log the keyvault never saw (K = 0): created, then one put of each size."""
    harness.provision(instance_id)
    log = [harness.create_raw(instance_id, config()).entry]
    client = harness.client(instance_id, account="writer")
    for i, size in enumerate(sizes):
        response = harness.host.execute_batch(
            instance_id, [client.seal(vault_put(f"r{i}", size)).command], NOW_MS
        )
        assert response.outcomes[0].accepted
        log.extend(response.entries)
    return log


def _boot(source: Harness, make_enclave: MakeEnclave, budget: int) -> Harness:
    """A new boot with `source`'s keys and its own, empty test keyvault."""
    new = Harness.start(make_enclave(), memory_budget_bytes=budget)
    new.factory = source.factory
    for (instance_id, version), key in source.data_keys.items():
        new.provision(instance_id, version, key)
    return new


@dataclass
class _Sizes:
    """Reference sizes, each measured alone under a budget that never refuses."""

    n_part: int  # "n" after its first part
    n_whole: int  # "n" restored
    m_first: int  # "m" after its first put
    m_second: int  # "m" after its second put


def _reference(
    source: Harness, make_enclave: MakeEnclave, log: list[envelope_pb2.LogEntry], d: int, e: int
) -> _Sizes:
    ref = _boot(source, make_enclave, 1 << 30)
    open_part(ref, "n", log[:2])
    n_part = memory_used(ref)
    ref.host.abandon_restore("n")
    ref.restore("n", log)
    n_whole = memory_used(ref)
    ref = _boot(source, make_enclave, 1 << 30)
    ref.create("m", config())
    assert ref.host.execute_batch(
        "m", [ref.client("m", account="a").seal(vault_put("p", d)).command], NOW_MS
    ).entries
    m_first = memory_used(ref)
    assert ref.host.execute_batch(
        "m", [ref.client("m", account="b").seal(vault_put("q", e)).command], NOW_MS
    ).entries
    return _Sizes(n_part, n_whole, m_first, memory_used(ref))


def _fits(call: Callable[[], object]) -> bool:
    """True if `call` passed; False if the enclave refused it for the budget (nothing else)."""
    error: EnclaveCallError | None = None
    try:
        call()
    except EnclaveCallError as exc:
        error = exc
    assert error is None or error.code == error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, error
    return error is None


@pytest.mark.parametrize("d", [10, 1500, 4200, 7600])
@pytest.mark.parametrize("e", [10, 900, 2100, 3300])
def test_the_limit_is_exact_for_execute_and_every_restore_part_in_any_interleaving(
    harness: Harness, make_enclave: MakeEnclave, d: int, e: int
) -> None:
    """Held: "m" served, "n" restored in two parts around an ExecuteBatch of "m". Every call is
    accepted exactly when what it leaves held fits the budget (never over it, never refused
    when it fits), with the open restore counted for "m" and "m" counted for each part of "n"."""
    log = _unregistered_log(harness, "n", [2000, 1000, 1500])
    sizes = _reference(harness, make_enclave, log, d, e)
    new = _boot(harness, make_enclave, BUDGET)
    new.create("m", config())
    first = new.host.execute_batch(
        "m", [new.client("m", account="a").seal(vault_put("p", d)).command], NOW_MS
    )
    assert bool(first.entries) == (sizes.m_first <= BUDGET)
    m = memory_used(new)
    assert m == (sizes.m_first if first.entries else 0)
    # The first part of "n".
    opened = _fits(lambda: open_part(new, "n", log[:2]))
    assert opened == (m + sizes.n_part <= BUDGET)
    assert memory_used(new) == m + (sizes.n_part if opened else 0) <= BUDGET
    # "m" executes while the restore is open: the open restore counts.
    used = memory_used(new)
    second = new.host.execute_batch(
        "m", [new.client("m", account="b").seal(vault_put("q", e)).command], NOW_MS
    )
    grown = sizes.m_second - sizes.m_first if first.entries else None
    if grown is not None:
        assert bool(second.entries) == (used + grown <= BUDGET)
        if second.entries:
            m += grown
    assert memory_used(new) <= BUDGET
    if not opened:
        return
    # The last part of "n": "m", as it is now, counts.
    restored = _fits(lambda: new.host.continue_restore("n", log[2:]))
    assert restored == (m + sizes.n_whole <= BUDGET)
    assert memory_used(new) == m + (sizes.n_whole if restored else 0) <= BUDGET


# --- 5. the host's abandon after a failure that is not a refusal ---------------------------------------


class _Failing(EnclaveHost):
    """The in-process host whose `fail_on`-th Restore call raises `error` (the runner died, say)
    after (or instead of) reaching the enclave; abandon calls may fail too."""

    def __init__(self, base: EnclaveHost, fail_on: int, error: BaseException, *, delivered: bool) -> None:
        super().__init__(base._transport)
        self.fail_on, self.error, self.delivered = fail_on, error, delivered
        self.restores = 0
        self.abandons = 0
        self.abandon_error: BaseException | None = None

    def call(self, method: str, request: Any, response_type: Any) -> Any:
        if method == "Restore" and request.abandon:
            self.abandons += 1
            if self.abandon_error is not None:
                raise self.abandon_error
            return super().call(method, request, response_type)
        if method == "Restore":
            self.restores += 1
            if self.restores == self.fail_on:
                if self.delivered:
                    super().call(method, request, response_type)
                raise self.error
        return super().call(method, request, response_type)


def _remote(fresh: Harness) -> RemoteHead:
    view = fresh.keyvault["v"]
    return RemoteHead(view.head.sequence, view.head.hash, statement=fresh.statement("v"))


@pytest.mark.parametrize("fail_on", [2, 3])
def test_a_dead_runner_mid_restore_is_raised_as_it_is_and_the_open_restore_is_dropped(
    logged: Harness, monkeypatch: pytest.MonkeyPatch, fail_on: int
) -> None:
    """Held: a later part failing with EnclaveUnavailableError: the host abandons (the enclave
    holds nothing afterwards) and the original error comes out, also when the abandon fails."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    rows = [StoredEntry.of(e) for e in logged.log["v"]]
    for abandon_fails in (False, True):
        fresh = logged.restarted()
        died = EnclaveUnavailableError("enclave runner exited (code -9)")
        host = _Failing(fresh.host, fail_on, died, delivered=False)
        if abandon_fails:
            host.abandon_error = EnclaveUnavailableError("enclave runner pipes are closed")
        log = recovery.read_log("v", MemoryLog(rows).store())
        with pytest.raises(EnclaveUnavailableError) as raised:
            recovery.restore(host, log, _remote(fresh), now_ms=NOW_MS)
        assert raised.value is died
        assert host.abandons == 1
        if not abandon_fails:
            assert memory_used(fresh) == 0
            assert not fresh.host.get_status().instances


# --- 3/4. start-up's LogMoved retry with a real enclave -------------------------------------------------


@dataclass
class _Compacting(MemoryLog):
    """An old owner that snapshots and compacts while recovery reads: at the `at`-th entries()
    call (the first one after `after`), rows up to the snapshot disappear and it is stored."""

    compact_to: StoredSnapshot | None = None
    after: int = 3
    times: int = 1
    snapshot_reads: int = 0
    entry_reads: list[int] = field(default_factory=list)

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        self.entry_reads.append(after)
        if after == self.after and self.times and self.compact_to is not None:
            self.times -= 1
            self.stored_snapshot = self.compact_to
            self.rows = [r for r in self.rows if r.sequence > self.compact_to.sequence]
        return super().entries(instance_id, after=after, through=through)

    def snapshot(self, instance_id: str) -> StoredSnapshot | None:
        self.snapshot_reads += 1
        return super().snapshot(instance_id)


def _startup(fresh: Harness, store: MemoryLog, releases: list[set[int]]) -> tuple[Any, Any]:
    """Startup._recover's collaborators: the test keyvault (its statement for each challenge),
    the store, and a runtime over the fresh enclave."""
    lock = threading.Lock()

    def get_commit_head(iid: str, _key: bytes, challenge: bytes) -> RemoteHead:
        head = fresh.keyvault[iid].head
        return RemoteHead(head.sequence, head.hash, fresh.statement_for(iid, challenge))

    startup: Any = object.__new__(Startup)
    startup.parts = SimpleNamespace(
        store=store, keyvault=SimpleNamespace(get_commit_head=get_commit_head), metrics=mock.MagicMock()
    )
    startup.ownership = SimpleNamespace(token=lambda _iid: 7)
    runtime: Any = SimpleNamespace(
        enclave=fresh.host,
        keys=fresh.keys,
        provisioner=SimpleNamespace(release_versions=lambda _iid, versions: releases.append(set(versions))),
        instances={},
        stale=set(),
        advancer=mock.MagicMock(),
        apply_lock=lock,
    )
    return startup, runtime


def _record() -> InstanceRecord:
    return InstanceRecord("v", config().SerializeToString(), 0)


def _snapshot_at(logged: Harness, sequence: int) -> StoredSnapshot:
    """A true snapshot of "v" at `sequence` (by a boot restored up to it)."""
    log = logged.log["v"]
    boot = logged.restarted()
    boot.restore(
        "v",
        log[:sequence],
        keyvault_head=envelope_pb2.CommitHead(sequence=sequence, hash=wire.entry_hash(log[sequence - 1])),
    )
    snapshot = boot.host.snapshot("v")
    return StoredSnapshot("v", sequence, snapshot.SerializeToString())


def test_a_log_compacted_during_recovery_is_read_again_and_served(
    logged: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: the old owner stores a snapshot at 5 and compacts 1..5 while part 1 (1..3) is in the
    enclave: LogMoved, the open restore is abandoned, attempt 2 reads the log from the snapshot,
    issues a new challenge, and serves 9."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    rows = [StoredEntry.of(e) for e in logged.log["v"]]
    fresh = logged.restarted()
    store = _Compacting(rows, compact_to=_snapshot_at(logged, 5))
    releases: list[set[int]] = []
    startup, runtime = _startup(fresh, store, releases)
    assert startup._recover(runtime, _record(), 0, 0, quiet=True) is False
    assert runtime.instances["v"].head.sequence == ENTRIES
    assert runtime.instances["v"].snapshot_sequence == 5
    assert releases == []
    assert [i.instance_id for i in fresh.host.get_status().instances] == ["v"]


def test_a_database_that_always_moves_is_refused_after_three_reads(
    logged: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: a hostile database that shows a gap and a newer snapshot at every read (a snapshot
    that is garbage, or that moves each time) makes start-up refuse after three attempts; the
    enclave holds nothing, and it never serves."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    rows = [StoredEntry.of(e) for e in logged.log["v"]]
    fresh = logged.restarted()
    moves = iter(range(4, 100))

    @dataclass
    class _Moving(MemoryLog):
        """Every page after the first skips an entry; the snapshot read that explains a gap
        (every second snapshot read: read_log's come first) always finds a newer one."""

        snapshot_reads: int = 0
        pages: int = 0

        def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
            rows = super().entries(instance_id, after=after, through=through)
            if after == 0:
                return rows
            self.pages += 1
            return rows[1:]

        def snapshot(self, instance_id: str) -> StoredSnapshot | None:
            self.snapshot_reads += 1
            return None if self.snapshot_reads % 2 else StoredSnapshot("v", next(moves), b"")

    store = _Moving(rows)
    startup, runtime = _startup(fresh, store, [])
    challenges = mock.patch.object(fresh.host, "issue_challenge", wraps=fresh.host.issue_challenge)
    with challenges as issued, pytest.raises(RecoveryRefused) as refused:
        startup._recover(runtime, _record(), 0, 0, quiet=True)
    assert isinstance(refused.value, recovery.LogMoved), refused.value
    assert issued.call_count == 3
    assert store.snapshot_reads == 6
    assert "v" not in runtime.instances
    assert memory_used(fresh) == 0
    assert not fresh.host.get_status().instances
