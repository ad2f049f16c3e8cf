"""Split brain with real processes: the owner of instances is SIGSTOPped (its enclave runner too),
another host takes them over, the old owner is SIGCONTed and still believes it owns them. It
acknowledges nothing more: whichever comes first after SIGCONT, its lease clock (not renewed for
a ttl: it stands down without asking) or a head advance under its old token (refused at the
keyvault, LEASE_LOST). No acknowledged command is lost or applied twice; the audit shows no head
advance under a superseded fencing token. (The keyvault's refusal itself is pinned down without
the race in tests/state/test_ownership.py and tests/keyvault/test_leases.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.harness import Undo, audit_events, client, running_cluster, split_brain
from veil.dev.cluster import Member

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_a_paused_owner_is_fenced_off_and_acknowledges_nothing_after_resuming(tmp_path: Path) -> None:
    with running_cluster(tmp_path, nodes=2, keyvaults=2, gateways=1) as cluster, client(cluster) as admin:

        def pause(member: Member) -> Undo:
            pids = cluster.pause(member)
            return lambda: cluster.resume(pids)  # SIGCONT

        outcome = split_brain(cluster, admin, pause)
        events = audit_events(cluster)
        # The harness checked that the old owner logged "lost instance" and that nothing was
        # acknowledged twice or advanced under a superseded token; the refusals are counted only.
        refused = [d for a, o, d in events if o == "refused" and d.get("reason") == "LEASE_LOST"]
        ledgers = outcome.ledgers
        after_resume = sum(1 for ledger in ledgers for t in ledger.acks if t > outcome.undone_at)
        print(
            f"\nsplit brain: {len(outcome.moved)} instance(s) answered at the new owner "
            f"{outcome.took_over:.2f}s after SIGSTOP; after SIGCONT the old owner stood down "
            f"(refused {len(refused)} time(s) with LEASE_LOST on the way); acknowledged "
            f"{sum(ledger.acknowledged for ledger in ledgers)} ({after_resume} after SIGCONT, all "
            "at the new owners), lost 0, duplicated 0"
        )
