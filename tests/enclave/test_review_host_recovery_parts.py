"""Outside review: the host's recovery in parts against a real in-process enclave and a
database whose rows change between the paged reads.

Each test documents that an attack is refused; those that say "Was a break" failed on the
code the review read and pass since the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import NOW_MS, Harness, config, fork, vault_put
from tests.state.support import MemoryLog
from veil.services.state import recovery
from veil.services.state.errors import RecoveryRefused
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.store import StoredEntry

ENTRIES = 9


@dataclass
class _Changing(MemoryLog):
    """Rows that change under recovery: entries() reads `pages` in turn, then `rows`."""

    pages: list[list[StoredEntry]] = field(default_factory=list)

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        rows = self.pages.pop(0) if self.pages else self.rows
        top = through if through is not None else 2**63
        return [r for r in rows if r.instance_id == instance_id and after < r.sequence <= top]


def _recover(fresh: Harness, store: MemoryLog, instance_id: str = "v") -> str:
    """Recovery of `instance_id` as startup.py runs it, under the test keyvault's head."""
    view = fresh.keyvault[instance_id]
    remote = RemoteHead(view.head.sequence, view.head.hash, statement=fresh.statement(instance_id))
    try:
        log = recovery.read_log(instance_id, store.store())
        recovery.check_freshness(log, remote)
        restored = recovery.restore(fresh.host, log, remote, now_ms=NOW_MS)
    except RecoveryRefused as exc:
        return f"refused: {exc.message}"
    return f"served at {restored.head.sequence}"


def test_pages_read_from_two_forks_are_refused_and_load_nothing(
    logged: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: the rows move from fork x to fork y between the paged reads (the head row read
    first is y's): the host's shape checks pass, the enclave refuses the mix, nothing loads."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 2)
    log = [StoredEntry.of(e) for e in logged.log["v"]]
    x = [StoredEntry.of(e) for e in fork(logged, "bob")]
    y = [StoredEntry.of(e) for e in fork(logged, "carol")]
    fork_x, fork_y = log + x, log + y
    fresh = logged.restarted()
    # head() reads `rows` (y); the freshness read of 9 and the pages 1..2 .. 9..10 come from x
    # (six reads), the page 11 from y: each part has its shape, the last ends at the head row.
    store = _Changing(fork_y, pages=[fork_x] * 6)
    said = _recover(fresh, store)
    assert said.startswith("refused:"), said
    assert "at sequence 11" in said
    status = fresh.host.get_status()
    assert not status.instances
    assert status.memory_used_bytes == 0


def test_the_same_database_read_consistently_serves(logged: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: fork y alone restores (as a head still to be confirmed)."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 2)
    log = [StoredEntry.of(e) for e in logged.log["v"]]
    y = [StoredEntry.of(e) for e in fork(logged, "carol")]
    assert _recover(logged.restarted(), MemoryLog(log + y)) == f"served at {ENTRIES + 2}"


def test_a_host_side_refusal_between_parts_leaves_no_restore_open_in_the_enclave(
    harness: Harness, make_enclave: MakeEnclave, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was a break: a page's shape is checked only after the part before it went in with `more`,
    and a gap in page 2 (rows compacted or lost between the reads) was refused on the host with
    nothing sent to end the restore left open in the enclave; its state stayed counted by the
    memory budget, so on a serving host (a take-over) the instances it served were refused writes
    (RESOURCE_EXHAUSTED). The host now abandons the open restore when it cannot send the rest."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", 3)
    harness.create("b", config())
    harness.create("w", config())
    writer = harness.client("b")
    for i in range(5):
        harness.call(writer, vault_put(f"r{i}", 2000 if i < 2 else 10))  # entries 2, 3 are large
    rows = [StoredEntry.of(e) for e in harness.log["b"]]
    damaged = [r for r in rows if r.sequence != 5]  # page 1 (1..3) sound; page 2 lost entry 5
    fresh = Harness.start(make_enclave(), memory_budget_bytes=8192)
    fresh.factory, fresh.keyvault, fresh.log = harness.factory, harness.keyvault, harness.log
    for (instance_id, version), key in harness.data_keys.items():
        fresh.provision(instance_id, version, key)
    fresh.restore("w", harness.log["w"])  # the instance this host serves
    serving = fresh.host.get_status().memory_used_bytes
    said = _recover(fresh, MemoryLog(damaged), "b")
    assert "at sequence 5: log entry is missing" in said
    held = fresh.host.get_status().memory_used_bytes - serving
    user = fresh.client("w")
    sealed = user.seal(vault_put("big", 5000))  # fits the budget with "w" alone
    accepted = fresh.host.execute_batch("w", [sealed.command], NOW_MS).outcomes[0].accepted
    assert (held, accepted) == (0, True), f"the abandoned restore holds {held} bytes"
