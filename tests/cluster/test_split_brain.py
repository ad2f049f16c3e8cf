"""Split brain with real processes: the owner of instances is SIGSTOPped (its enclave runner too),
another host takes them over, the old owner is SIGCONTed and still believes it owns them. It is
refused at the keyvault (LEASE_LOST) and acknowledges nothing more; no acknowledged command is
lost or applied twice; the audit shows no head advance under a superseded fencing token."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster.harness import (
    INITIAL,
    Workload,
    audit_events,
    balances,
    client,
    create_ledgers,
    lost_and_duplicated,
    owners,
    running_cluster,
    stale_advances,
    wait_taken_over,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_a_paused_owner_is_fenced_off_and_acknowledges_nothing_after_resuming(tmp_path: Path) -> None:
    with running_cluster(tmp_path, nodes=2, keyvaults=2, gateways=1) as cluster, client(cluster) as admin:
        ledgers = create_ledgers(admin, 4)
        placed = owners(cluster)
        old = cluster.role("state")[1]  # not the default shard (see test_failover)
        moved = [ledger for ledger in ledgers if placed[ledger.instance_id] == old.address]
        if not moved:  # rendezvous put nothing there: create until something lands on it
            ledgers += create_ledgers(admin, 4)
            placed = owners(cluster)
            moved = [ledger for ledger in ledgers if placed[ledger.instance_id] == old.address]
        assert moved, placed
        workload = Workload(cluster, ledgers)
        workload.start()
        time.sleep(1.5)
        paused_at = time.monotonic()
        pids = cluster.pause(old)
        try:
            took_over = wait_taken_over(cluster, moved, old.address, paused_at, 40, ledgers)
        finally:
            cluster.resume(pids)  # the old owner wakes up, still believing it owns them
        resumed = time.monotonic()
        time.sleep(3.0)  # its renewals and held advances reach the keyvault and are refused
        workload.stop()
        assert all(not ledger.errors for ledger in ledgers), [ledger.errors for ledger in ledgers]
        assert old.process is not None
        assert old.process.poll() is None
        log = old.log_path.read_text()
        assert "lost instance" in log, "the old owner never learned it lost its lease"
        assert all(owners(cluster)[ledger.instance_id] != old.address for ledger in moved)
        events = audit_events(cluster)
        assert stale_advances(events) == []
        refused = [d for a, o, d in events if o == "refused" and d.get("reason") == "LEASE_LOST"]
        assert refused, "no LEASE_LOST refusal was audited"
        for ledger in ledgers:
            assert lost_and_duplicated(cluster, ledger) == (0, 0), ledger.instance_id
            assert sum(balances(admin, ledger)) == 2 * INITIAL
        after_resume = sum(1 for ledger in ledgers for t in ledger.acks if t > resumed)
        print(
            f"\nsplit brain: {len(moved)} instance(s) answered at the new owner {took_over:.2f}s after "
            f"SIGSTOP; after SIGCONT the old owner was refused {len(refused)} time(s) (LEASE_LOST); "
            f"acknowledged {sum(ledger.acknowledged for ledger in ledgers)} ({after_resume} after "
            "SIGCONT, all at the new owners), lost 0, duplicated 0"
        )
