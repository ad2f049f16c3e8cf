"""`make chaos-cluster`: node losses and split brains in a loop on a local cluster under load.

Each episode picks a state host that owns instances and either kills it (-9, with its enclave
runner: a machine lost; it is started again as a fresh standby once its instances answer
elsewhere) or, every Nth episode, makes a split brain: pauses it (SIGSTOP) or cuts it off (a
partition: every packet it sends dropped, where the machine allows it; the two alternate) until
its instances answer elsewhere, then resumes or heals it, its late work refused by its fencing
token. Failover time is from
the fault to the first acknowledged command of each of its instances at the new owner. At the
end: acknowledged, lost (acknowledged but not in the log) and duplicated (in the log but never
acknowledged), which must both be 0, balances conserved, and no head advance under a superseded
fencing token in the keyvault's audit.

    python -m tests.cluster.chaos --episodes 25 --split-every 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.harness import (
    INITIAL,
    Ledger,
    Workload,
    audit_events,
    balances,
    client,
    create_ledgers,
    ledger_errors,
    lost_and_duplicated,
    owned_by,
    owners,
    running_cluster,
    stale_advances,
    wait_taken_over,
)
from veil.dev.cluster import Cluster, partitions_unavailable

EPISODE_TIMEOUT_S = 60.0


@dataclass
class ChaosResult:
    node_losses: int = 0
    split_brains: int = 0
    partitions: int = 0
    failovers: list[float] = field(default_factory=list)
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.lost == 0 and self.duplicated == 0

    def summary(self) -> str:
        p50 = statistics.median(self.failovers) if self.failovers else float("nan")
        top = max(self.failovers, default=float("nan"))
        return (
            f"node losses {self.node_losses}, split brains {self.split_brains} ({self.partitions} by "
            f"partition): acknowledged "
            f"{self.acknowledged}, lost {self.lost}, duplicated {self.duplicated}; failover over "
            f"{len(self.failovers)} episodes (the slowest instance of each) p50 {p50:.2f}s max {top:.2f}s; "
            f"{'OK' if self.ok else 'FAILED: ' + '; '.join(self.errors[:5])}"
        )


def _episode(
    cluster: Cluster,
    ledgers: list[Ledger],
    rng: random.Random,
    split: bool,
    result: ChaosResult,
    cut: bool = False,
) -> None:
    placed = owners(cluster)
    busy = [m for m in cluster.role("state") if m.address in placed.values() and m.process is not None]
    victim = rng.choice(busy)
    moved = owned_by(ledgers, placed, victim.address)
    start = time.monotonic()
    pids = cluster.pause(victim) if split and not cut else None
    if cut:
        cluster.cut(victim)
    if not split:
        cluster.kill9(victim)
    try:
        failover = wait_taken_over(cluster, moved, victim.address, start, EPISODE_TIMEOUT_S, ledgers)
    except AssertionError as exc:
        result.errors.append(f"{victim.label}: {exc}")
        return
    finally:
        if pids is not None:
            cluster.resume(pids)
        if cut:
            cluster.heal(victim)
    result.failovers.append(failover)
    if split:
        result.split_brains += 1
        result.partitions += cut
    else:
        result.node_losses += 1
        victim.start()  # a replacement machine: same name, its instances now served elsewhere
        cluster.wait_serving(victim)
    time.sleep(1.0)


def run(episodes: int, split_every: int, ledgers_count: int, seed: int, log: bool = True) -> ChaosResult:
    result = ChaosResult()
    rng = random.Random(seed)
    can_cut = partitions_unavailable() is None
    with (
        tempfile.TemporaryDirectory() as workdir,
        running_cluster(Path(workdir), nodes=3, keyvaults=2, gateways=2, partitions=can_cut) as cluster,
        client(cluster) as admin,
    ):
        ledgers = create_ledgers(admin, ledgers_count)
        workload = Workload(cluster, ledgers)
        workload.start()
        time.sleep(1.0)
        try:
            for number in range(1, episodes + 1):
                split = split_every > 0 and number % split_every == 0
                cut = split and can_cut and (number // split_every) % 2 == 0
                _episode(cluster, ledgers, rng, split, result, cut)
                if log:
                    kind = ("partition" if cut else "split brain") if split else "node loss"
                    print(
                        f"episode {number}: {kind}, failover so far max {max(result.failovers):.2f}s",
                        flush=True,
                    )
                if result.errors or ledger_errors(ledgers):
                    break
        finally:
            workload.stop()
        result.errors += ledger_errors(ledgers)
        for ledger in ledgers:
            lost, duplicated = lost_and_duplicated(cluster, ledger)
            result.lost += lost
            result.duplicated += duplicated
            result.acknowledged += ledger.acknowledged
            try:
                if sum(balances(admin, ledger)) != 2 * INITIAL:
                    result.errors.append(f"{ledger.instance_id}: supply not conserved")
            except Exception as exc:  # reported with the counts, not instead of them
                result.errors.append(f"{ledger.instance_id}: balances unreadable: {exc}")
        stale = stale_advances(audit_events(cluster))
        if stale:
            result.errors.append(f"{len(stale)} head advance(s) under a superseded fencing token")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=25)
    parser.add_argument(
        "--split-every", type=int, default=5, help="every Nth episode is a SIGSTOP split brain"
    )
    parser.add_argument("--ledgers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.episodes, args.split_every, args.ledgers, args.seed)
    print(result.summary(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
