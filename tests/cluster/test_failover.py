"""A state host lost for good: its instances are taken over by survivors (lease expiry,
acquisition, fenced key release, replay), the gateways route there, nothing acknowledged is lost
or applied twice. Real processes: 2 keyvault replicas on PostgreSQL, 3 state hosts, 2 gateways."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster.harness import (
    Workload,
    assert_nothing_lost,
    client,
    create_ledgers,
    ledger_errors,
    owned_by,
    owners,
    running_cluster,
    wait_taken_over,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
LEDGERS = 6


def test_a_state_host_killed_for_good_is_taken_over_with_nothing_lost(tmp_path: Path) -> None:
    with running_cluster(tmp_path, nodes=3, keyvaults=2, gateways=2) as cluster, client(cluster) as admin:
        began = time.monotonic()
        ledgers = create_ledgers(admin, LEDGERS)
        print(f"\nledgers created in {time.monotonic() - began:.1f}s")
        placed = owners(cluster)
        assert len(set(placed.values())) >= 2, placed  # spread over the hosts
        assert set(placed.values()) - {cluster.addresses("state")[0]}, placed
        # Not the first host: the gateways' default shard, which answers the instance-less
        # GetAttestation every SDK connect starts with (no fallback yet: see the README).
        candidates = set(placed.values()) - {cluster.addresses("state")[0]}
        victim_address = max(candidates, key=list(placed.values()).count)
        victim = next(m for m in cluster.role("state") if m.address == victim_address)
        moved = owned_by(ledgers, placed, victim_address)
        workload = Workload(cluster, ledgers)
        workload.start()
        time.sleep(2.0)
        killed = time.monotonic()
        cluster.kill9(victim)  # and never restarted
        longest = wait_taken_over(cluster, moved, victim_address, killed, 40, ledgers)
        time.sleep(1.0)
        stopping = time.monotonic()
        workload.stop()
        print(f"workload stopped in {time.monotonic() - stopping:.1f}s")
        after = owners(cluster)
        assert all(after[ledger.instance_id] != victim_address for ledger in moved)
        assert not ledger_errors(ledgers)
        assert_nothing_lost(cluster, admin, ledgers)
        with client(cluster, gateway=1) as other:  # the other gateway routes there too
            for ledger in moved:
                assert other.token(ledger.instance_id, ledger.holders[0]).balance() >= 0
        print(
            f"\nfailover of {len(moved)} instance(s) after kill -9 of {victim.label}: "
            f"max {longest:.2f}s from the kill (lease ttl {cluster.lease_ttl_ms} ms); "
            f"acknowledged {sum(ledger.acknowledged for ledger in ledgers)}, lost 0, duplicated 0"
        )
