"""Outside review (second): start-up's attempt loop (LogMoved, MissingKey), `_missing`, and the
abandon on a failure that is not a refusal, without an enclave.

Each test documents what held; a test that showed a break says "Was a break" and asserts the
wanted behaviour (so it fails on the code the review read).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from tests.state.support import MemoryLog, make_entries
from veil.enclave import wire
from veil.enclave.v1 import ecall_pb2, envelope_pb2, error_pb2
from veil.services.state import recovery
from veil.services.state.enclave_host import EnclaveCallError
from veil.services.state.errors import RecoveryRefused, StoreError
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.startup import Startup
from veil.services.state.store import InstanceRecord, StoredEntry, StoredSnapshot

INSTANCE = "tokens"
STATEMENT = envelope_pb2.HeadStatement()


# --- 3. the attempt loop, scripted ------------------------------------------------------------------


@dataclass
class _Script:
    """What each recovery.restore attempt does: "ok", "moved" (LogMoved) or "missing" (MissingKey),
    and everything start-up did meanwhile."""

    outcomes: list[str]
    logs_read: int = 0
    challenges: list[bytes] = field(default_factory=list)
    calls: list[tuple[str, Any, Any]] = field(default_factory=list)  # (what, log, remote)
    releases: list[set[int]] = field(default_factory=list)

    def read_log(self, instance_id: str, store: object) -> Any:
        self.logs_read += 1
        return SimpleNamespace(name=f"log{self.logs_read}", entry_count=1, snapshot_sequence=0)

    def check_freshness(self, log: Any, remote: RemoteHead) -> None:
        self.calls.append(("fresh", log, remote))

    def restore(self, enclave: object, log: Any, remote: RemoteHead, *, now_ms: int, **_: Any) -> Any:
        self.calls.append(("restore", log, remote))
        outcome = self.outcomes[sum(1 for c in self.calls if c[0] == "restore") - 1]
        if outcome == "moved":
            raise recovery.LogMoved(INSTANCE, 4, "the log moved")
        if outcome == "missing":
            raise recovery.MissingKey("key version 2 not provisioned", {1, 2})
        return ecall_pb2.RestoreResponse(head=envelope_pb2.CommitHead(sequence=9, hash=b"h" * 32))

    def get_commit_head(self, iid: str, key: bytes, challenge: bytes) -> RemoteHead:
        return RemoteHead(9, b"h" * 32, envelope_pb2.HeadStatement(challenge=challenge))

    def issue_challenge(self, iid: str) -> bytes:
        self.challenges.append(bytes([len(self.challenges)]) * 32)
        return self.challenges[-1]


def _run(script: _Script, monkeypatch: pytest.MonkeyPatch) -> tuple[str, bool | None]:
    monkeypatch.setattr(recovery, "read_log", script.read_log)
    monkeypatch.setattr(recovery, "check_freshness", script.check_freshness)
    monkeypatch.setattr(recovery, "restore", script.restore)
    startup: Any = object.__new__(Startup)
    startup.parts = SimpleNamespace(
        store=None, keyvault=SimpleNamespace(get_commit_head=script.get_commit_head), metrics=mock.MagicMock()
    )
    startup.ownership = SimpleNamespace(token=lambda _iid: 7)
    runtime: Any = SimpleNamespace(
        enclave=SimpleNamespace(issue_challenge=script.issue_challenge),
        keys=SimpleNamespace(signing_public_key=b"k"),
        provisioner=SimpleNamespace(release_versions=lambda _iid, v: script.releases.append(set(v))),
        instances={},
        stale=set(),
        advancer=mock.MagicMock(),
        apply_lock=threading.Lock(),
    )
    record = InstanceRecord(INSTANCE, b"", 0)
    try:
        released = startup._recover(runtime, record, 0, 0, quiet=True)
    except recovery.LogMoved:
        return "moved", None
    except recovery.MissingKey:
        return "missing", None
    assert INSTANCE in runtime.instances
    return "ok", released


def _expected(outcomes: list[str]) -> tuple[str, int]:
    """What the loop should do with `outcomes`: how it ends and after how many attempts (a key
    release at most once, a log read again at most twice)."""
    moves, released = 0, False
    for attempt, outcome in enumerate(outcomes, start=1):
        if outcome == "ok":
            return "ok", attempt
        if outcome == "moved":
            moves += 1
            if moves > 2:
                return "moved", attempt
        elif released:
            return "missing", attempt
        else:
            released = True
    raise AssertionError("the script ran out")


@pytest.mark.parametrize(
    "outcomes", [[*p, "ok"] for p in itertools.product(["ok", "moved", "missing"], repeat=4)], ids="-".join
)
def test_every_sequence_of_attempts_ends_bound_with_at_most_one_release(
    outcomes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: for every script of outcomes, the loop serves or raises the right error (never
    UnboundLocalError); keys are released at most once, and only for a MissingKey; a log is read
    again only after LogMoved, at most twice; every attempt asks a new challenge and a statement
    for it, and checks and restores the log of that attempt under that statement. (After the
    review: the re-reads and the release have budgets of their own, not three attempts shared.)"""
    script = _Script(outcomes)
    ended, released = _run(script, monkeypatch)
    restores = [c for c in script.calls if c[0] == "restore"]
    attempts = len(restores)
    assert (ended, attempts) == _expected(outcomes)
    assert len(script.releases) == (1 if "missing" in outcomes[: attempts - 1] else 0)
    if ended == "ok":
        assert released == bool(script.releases)
    assert script.logs_read == 1 + outcomes[: attempts - 1].count("moved")
    assert len(script.challenges) == attempts
    for number, (fresh, restore) in enumerate(zip(script.calls[::2], script.calls[1::2], strict=True)):
        assert (fresh[0], restore[0]) == ("fresh", "restore")
        assert fresh[1] is restore[1]
        assert fresh[2] is restore[2]
        assert restore[2].statement.challenge == script.challenges[number]


def test_the_loop_before_log_moved_is_the_same_for_key_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held (compared with 7ef1c30, two attempts): without LogMoved, the same attempts and releases."""
    for outcomes, want in [
        (["ok"], ("ok", 0, 1)),
        (["missing", "ok"], ("ok", 1, 2)),
        (["missing", "missing"], ("missing", 1, 2)),
    ]:
        script = _Script(list(outcomes))
        ended, _ = _run(script, monkeypatch)
        assert (ended, len(script.releases), len(script.challenges)) == want


def test_two_moves_then_a_missing_key_is_served_after_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was a note: the three attempts were shared, so a log that moved twice and then needed an
    older key version was refused with MissingKey without the release that would have served it."""
    script = _Script(["moved", "moved", "missing", "ok"])
    assert _run(script, monkeypatch) == ("ok", True)
    assert script.releases == [{1, 2}]


# --- 4. _missing and a hostile database ----------------------------------------------------------------


class _Enclave:
    """Takes every part; answers the head of the last entry sent; counts abandons."""

    def __init__(self, fail_on: int = 0, error: BaseException | None = None) -> None:
        self.parts: list[list[bytes]] = []
        self.abandons = 0
        self.fail_on, self.error = fail_on, error

    def _take(self, entries: list[bytes], snapshot: Any) -> ecall_pb2.RestoreResponse:
        self.parts.append(list(entries))
        if len(self.parts) == self.fail_on and self.error is not None:
            raise self.error
        sent = [blob for part in self.parts for blob in part]
        if not sent:
            return ecall_pb2.RestoreResponse(head=snapshot.head)
        last = envelope_pb2.LogEntry.FromString(sent[-1])
        return ecall_pb2.RestoreResponse(
            head=envelope_pb2.CommitHead(sequence=last.sequence, hash=wire.entry_hash(last))
        )

    def restore(self, instance_id: str, entries: list[bytes], snapshot: Any, **kwargs: Any) -> Any:
        self.parts = []
        return self._take(entries, snapshot)

    def continue_restore(self, instance_id: str, entries: list[bytes], *, more: bool) -> Any:
        return self._take(entries, None)

    def abandon_restore(self, instance_id: str) -> None:
        self.abandons += 1


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"recovery-{INSTANCE}")]


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)


def _remote() -> RemoteHead:
    return RemoteHead(0, wire.ZERO_HASH, STATEMENT)


@dataclass
class _Gapped(MemoryLog):
    """Page 2 misses entry 4; `behind` is the snapshot the gap check reads (read_log sees none);
    `snapshot_error` makes that read fail."""

    behind: StoredSnapshot | None = None
    snapshot_error: Exception | None = None
    snapshot_reads: int = 0

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        rows = super().entries(instance_id, after=after, through=through)
        return [r for r in rows if r.sequence != 4]

    def snapshot(self, instance_id: str) -> StoredSnapshot | None:
        self.snapshot_reads += 1
        if self.snapshot_reads == 1:
            return None
        if self.snapshot_error is not None:
            raise self.snapshot_error
        return self.behind


@pytest.mark.parametrize(
    ("behind", "moved"),
    [(None, False), (0, False), (3, True), (4, True), (2**63 - 1, True)],
    ids=["none", "same", "older-than-the-gap", "at-the-gap", "far-past-the-head"],
)
def test_a_gap_is_log_moved_only_for_a_newer_snapshot_and_the_open_restore_is_dropped(
    behind: int | None, moved: bool
) -> None:
    """Held: the gap at 4 is LogMoved for any stored snapshot newer than the one read (whatever
    it holds: read_log and the enclave check it on the next attempt), a gap otherwise; either way
    part 1 (1..3) went in, the host abandons it, and no reader thread is left."""
    rows = make_entries(INSTANCE, 1, 9)
    snapshot = None if behind is None else StoredSnapshot(INSTANCE, behind, b"")
    store = _Gapped(rows, behind=snapshot)
    enclave = _Enclave()
    log = recovery.read_log(INSTANCE, store.store())
    with pytest.raises(RecoveryRefused, match="at sequence 4") as refused:
        recovery.restore(enclave, log, _remote(), now_ms=0)  # type: ignore[arg-type]
    assert isinstance(refused.value, recovery.LogMoved) == moved
    assert enclave.parts == [[r.blob for r in rows[:3]]]
    assert enclave.abandons == 1
    assert not _readers()


def test_a_failing_snapshot_read_in_the_gap_check_is_a_store_error_and_abandons() -> None:
    """Held: the database failing the gap check's snapshot read: StoreError (start-up retries the
    database with backoff), the open restore abandoned, no reader thread left."""
    rows = make_entries(INSTANCE, 1, 9)
    store = _Gapped(rows, snapshot_error=StoreError("SQLite error: disk I/O error"))
    enclave = _Enclave()
    log = recovery.read_log(INSTANCE, store.store())
    with pytest.raises(StoreError):
        recovery.restore(enclave, log, _remote(), now_ms=0)  # type: ignore[arg-type]
    assert enclave.abandons == 1
    assert not _readers()


def test_a_compaction_seen_only_by_the_diagnosis_is_to_be_read_again() -> None:
    """Was a break (availability, a narrow race; not a security issue): the enclave refuses part 2
    for a key version it lacks (a MissingKey: release, retry), and the old owner snapshots at 5
    and compacts 1..5 before the diagnosis reads the whole log. verify_chain saw a gap at 1 and
    _refusal called it a broken log (at start-up the host failed) although a newer snapshot
    explains the gap. The diagnosis now applies `_missing`'s rule: LogMoved."""
    rows = make_entries(INSTANCE, 1, 9)
    memory = MemoryLog(list(rows))
    lacking = EnclaveCallError(
        "Restore",
        error_pb2.EcallError(
            code=error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION,
            message=f"key version 2 of {INSTANCE!r} not provisioned",
        ),
    )

    class _CompactingEnclave(_Enclave):
        def continue_restore(self, instance_id: str, entries: list[bytes], *, more: bool) -> Any:
            # The old owner, meanwhile: a snapshot at 5, entries 1..5 deleted.
            memory.stored_snapshot = StoredSnapshot(INSTANCE, 5, b"a snapshot at 5")
            memory.rows = [r for r in memory.rows if r.sequence > 5]
            raise lacking

    log = recovery.read_log(INSTANCE, memory.store())
    with pytest.raises((RecoveryRefused, recovery.MissingKey)) as refused:
        recovery.restore(_CompactingEnclave(), log, _remote(), now_ms=0)  # type: ignore[arg-type]
    assert isinstance(refused.value, (recovery.LogMoved, recovery.MissingKey)), refused.value


# --- 5. the abandon on what is not a refusal ---------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [KeyboardInterrupt(), SystemExit(3), RuntimeError("a bug"), StoreError("PostgreSQL error: gone")],
    ids=["keyboard-interrupt", "system-exit", "bug", "store-error"],
)
def test_the_original_error_comes_out_after_the_abandon_even_when_that_fails(error: BaseException) -> None:
    """Held: whatever ends a restore in parts after part 1 went in (the enclave did not refuse
    it), the host abandons once and re-raises that very error, also when the abandon fails.
    KeyboardInterrupt and SystemExit are raised as they are with no abandon (after the review:
    mid-call the pipe may be half a frame through, so another ECALL could block)."""
    rows = make_entries(INSTANCE, 1, 9)

    class _AbandonFails(_Enclave):
        def abandon_restore(self, instance_id: str) -> None:
            self.abandons += 1
            raise EnclaveCallError(
                "Restore", error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_INTERNAL, message="x")
            )

    for enclave in (_Enclave(fail_on=2, error=error), _AbandonFails(fail_on=2, error=error)):
        log = recovery.read_log(INSTANCE, MemoryLog(rows).store())
        with pytest.raises(type(error)) as raised:
            recovery.restore(enclave, log, _remote(), now_ms=0)  # type: ignore[arg-type]
        assert raised.value is error
        assert enclave.abandons == (1 if isinstance(error, Exception) else 0)
        assert not _readers()


def test_a_refused_part_is_not_abandoned_and_a_first_part_failure_is() -> None:
    """Held: the enclave refusing a later part ended the restore itself (no abandon); a failure
    of the first part is abandoned too (after the review: the part may have gone in and only its
    answer been lost; with nothing open the abandon does nothing)."""
    rows = make_entries(INSTANCE, 1, 9)
    refusal = EnclaveCallError(
        "Restore", error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_DATA_LOSS, message="log entry 5: x")
    )
    enclave = _Enclave(fail_on=2, error=refusal)
    log = recovery.read_log(INSTANCE, MemoryLog(rows).store())
    with pytest.raises(RecoveryRefused, match="at sequence 5"):
        recovery.restore(enclave, log, _remote(), now_ms=0)  # type: ignore[arg-type]
    assert enclave.abandons == 0
    enclave = _Enclave(fail_on=1, error=RuntimeError("the runner is gone"))
    with pytest.raises(RuntimeError):
        recovery.restore(enclave, log, _remote(), now_ms=0)  # type: ignore[arg-type]
    assert enclave.abandons == 1
