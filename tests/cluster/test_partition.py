"""Split brain by a partition: the owner of instances keeps running but every packet it sends is
dropped (iptables on its cgroup: to the keyvaults, the database and the gateways). Another host
takes its instances over; the partition heals; the old owner, which stopped serving them once
it could not renew its leases for a whole ttl, acknowledges nothing more. Skipped, with the
reason, where the machine cannot partition a process (root, cgroup v2, iptables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.harness import Undo, client, running_cluster, split_brain
from veil.dev.cluster import Member, partitions_unavailable

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

        def cut(member: Member) -> Undo:
            cluster.cut(member)
            return lambda: cluster.heal(member)

        outcome = split_brain(cluster, admin, cut)
        acknowledged = sum(ledger.acknowledged for ledger in outcome.ledgers)
        print(
            f"\npartition: {len(outcome.moved)} instance(s) answered at the new owner "
            f"{outcome.took_over:.2f}s after the cut; acknowledged {acknowledged}, lost 0, duplicated 0"
        )
