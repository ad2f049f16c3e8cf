"""Split brain by a partition: the owner of instances keeps running but every packet it sends is
dropped (iptables on its cgroup: to the keyvaults, the database and the gateways). Another host
takes its instances over; the partition heals; the old owner, which stopped serving them once
it could not renew its leases for a whole ttl, acknowledges nothing more. Skipped, with the
reason, where the machine cannot partition a process (root, cgroup v2, iptables)."""

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
from veil.dev.cluster import partitions_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_a_partitioned_owner_is_fenced_off_and_acknowledges_nothing_after_healing(tmp_path: Path) -> None:
    reason = partitions_unavailable()
    if reason is not None:
        print(f"\nskipped: {reason}")
        pytest.skip(reason)
    with (
        running_cluster(tmp_path, nodes=2, keyvaults=2, gateways=1, partitions=True) as cluster,
        client(cluster) as admin,
    ):
        ledgers = create_ledgers(admin, 4)
        placed = owners(cluster)
        old = cluster.role("state")[1]  # not the default shard (see test_failover)
        moved = [ledger for ledger in ledgers if placed[ledger.instance_id] == old.address]
        if not moved:
            ledgers += create_ledgers(admin, 4)
            placed = owners(cluster)
            moved = [ledger for ledger in ledgers if placed[ledger.instance_id] == old.address]
        assert moved, placed
        workload = Workload(cluster, ledgers)
        workload.start()
        time.sleep(1.5)
        cut_at = time.monotonic()
        cluster.cut(old)
        try:
            took_over = wait_taken_over(cluster, moved, old.address, cut_at, 40, ledgers)
        finally:
            cluster.heal(old)
        time.sleep(3.0)  # the healed owner's late renewals and advances reach the keyvault
        workload.stop()
        assert all(not ledger.errors for ledger in ledgers), [ledger.errors for ledger in ledgers]
        assert old.process is not None
        assert old.process.poll() is None
        deadline = time.monotonic() + 10
        while "lost instance" not in old.log_path.read_text():
            assert time.monotonic() < deadline, "the old owner never stopped serving them"
            time.sleep(0.2)
        assert all(owners(cluster)[ledger.instance_id] != old.address for ledger in moved)
        assert stale_advances(audit_events(cluster)) == []
        for ledger in ledgers:
            assert lost_and_duplicated(cluster, ledger) == (0, 0), ledger.instance_id
            assert sum(balances(admin, ledger)) == 2 * INITIAL
        print(
            f"\npartition: {len(moved)} instance(s) answered at the new owner {took_over:.2f}s after the "
            f"cut; acknowledged {sum(ledger.acknowledged for ledger in ledgers)}, lost 0, duplicated 0"
        )
