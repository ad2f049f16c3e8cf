"""Keyvault redundancy: two replicas on one PostgreSQL both move heads and append audit events
concurrently (each state host prefers another one); one is killed during load. The state hosts
retry on the other replica: no command fails, nothing acknowledged is lost or duplicated, and the
audit chain and every instance's heads stay linear."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from tests.cluster.harness import (
    Workload,
    audit_chain_breaks,
    audit_events_raw,
    client,
    create_ledgers,
    head_breaks,
    ledger_errors,
    lost_and_duplicated,
    running_cluster,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_killing_a_keyvault_replica_costs_retries_not_errors(tmp_path: Path) -> None:
    with running_cluster(tmp_path, nodes=2, keyvaults=2, gateways=1) as cluster, client(cluster) as admin:
        ledgers = create_ledgers(admin, 4)
        workload = Workload(cluster, ledgers)
        workload.start()
        time.sleep(2.0)
        before = sum(ledger.acknowledged for ledger in ledgers)
        killed = time.monotonic()
        cluster.kill9(cluster.member("keyvault-0"))  # state-0's preferred replica
        time.sleep(4.0)
        workload.stop()
        after = sum(len([t for t in ledger.acks if t > killed]) for ledger in ledgers)
        assert not ledger_errors(ledgers)
        assert after > 0, "nothing was acknowledged after the replica died"
        for ledger in ledgers:
            assert lost_and_duplicated(cluster, ledger) == (0, 0), ledger.instance_id
        events = audit_events_raw(cluster)
        assert audit_chain_breaks(events) == []
        assert head_breaks(events) == []
        callers = {e.caller for e in events}
        longest = max(
            (b - a for ledger in ledgers for a, b in itertools.pairwise(ledger.acks) if b > killed),
            default=0.0,
        )
        print(
            f"\nkeyvault-0 killed under load: {before} acknowledged before, {after} in the 4 s after, "
            f"0 errors, longest pause of one ledger {longest:.2f}s; audit chain of {len(events)} events "
            f"linear ({len(callers)} callers), heads linear"
        )
