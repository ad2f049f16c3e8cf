"""A local cluster (veil.dev.cluster) with SDK clients working through its gateways, and what
they saw: acknowledged transfers per instance, and when each instance answered again after a fault."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric import ed25519
from psycopg import sql

from tests.admin_client import admin_client
from tests.workers import Workers
from veil.dev.cluster import Cluster, Member
from veil.dev.loadclient import token_config_for
from veil.dev.pki import admin_tls, init_pki
from veil.enclave.v1 import apps_pb2
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.sdk.client import VeilClient
from veil.sdk.identity import SigningIdentity
from veil.services.common.channels import call, secure_channel

INITIAL = 1_000
CLIENT_TIMEOUT_S = 60.0


@contextmanager
def running_cluster(workdir: Path, **options: int) -> Iterator[Cluster]:
    data_dir = workdir / ".veil"
    init_pki(data_dir / "pki")
    cluster = Cluster(data_dir, **options)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.drop_schemas()


def client(cluster: Cluster, gateway: int = 0) -> VeilClient:
    """An SDK client with the admin certificate, through one of the gateways."""
    return admin_client(cluster.addresses("gateway")[gateway], cluster.data_dir, CLIENT_TIMEOUT_S)


def audit_events(cluster: Cluster) -> list[tuple[str, str, dict[str, object]]]:
    """Every keyvault audit event as (action, outcome, detail), read as the admin."""
    return [(e.action, e.outcome, json.loads(e.detail_json)) for e in audit_events_raw(cluster)]


def audit_events_raw(cluster: Cluster) -> list[keyvault_pb2.AuditEvent]:
    """Every keyvault audit event as served, read as the admin from the surviving last replica."""
    events: list[keyvault_pb2.AuditEvent] = []
    with secure_channel(cluster.addresses("keyvault")[-1], admin_tls(cluster.data_dir / "pki")) as channel:
        stub = keyvault_pb2_grpc.KeyvaultServiceStub(channel)
        token = ""
        while True:
            request = keyvault_pb2.ListAuditEventsRequest(page_size=1000, page_token=token)
            page = call(stub.ListAuditEvents, request)
            events += list(page.events)
            token = page.next_page_token
            if not token:
                return events


def audit_chain_breaks(events: list[keyvault_pb2.AuditEvent]) -> list[int]:
    """Sequences where the chain is not linear (a gap, or a previous hash that is not the last)."""
    breaks = []
    for previous, event in itertools.pairwise(events):
        if event.sequence != previous.sequence + 1 or event.previous_hash != previous.hash:
            breaks.append(event.sequence)
    return breaks


def head_breaks(events: list[keyvault_pb2.AuditEvent]) -> list[str]:
    """Allowed head advances that do not start where the instance's previous one ended."""
    ends: dict[str, int] = {}
    breaks = []
    for event in events:
        if (event.action, event.outcome) != ("advance_commit_head", "allowed"):
            continue
        detail = json.loads(event.detail_json)
        instance = detail["instance_id"]
        if detail["previous_sequence"] != ends.get(instance, 0):
            breaks.append(f"{instance}: {detail['previous_sequence']} after {ends.get(instance, 0)}")
        ends[instance] = detail["sequence"]
    return breaks


def stale_advances(events: list[tuple[str, str, dict[str, object]]]) -> list[dict[str, object]]:
    """Head advances the keyvault allowed under a fencing token older than one it had already
    granted for that instance (must be none: a fenced-off owner moves nothing)."""
    granted: dict[str, int] = {}
    stale = []
    for action, outcome, detail in events:
        instance = str(detail.get("instance_id", ""))
        token = int(str(detail.get("fencing_token", 0)))
        if action == "acquire_lease" and outcome == "allowed":
            granted[instance] = max(granted.get(instance, 0), token)
        elif action == "advance_commit_head" and outcome == "allowed" and token < granted.get(instance, 0):
            stale.append(detail)
    return stale


def owners(cluster: Cluster) -> dict[str, str]:
    """instance id -> the state host (address) holding its lease, as the keyvault says."""
    with secure_channel(cluster.addresses("keyvault")[0], admin_tls(cluster.data_dir / "pki")) as channel:
        stub = keyvault_pb2_grpc.KeyvaultServiceStub(channel)
        reply = call(stub.ListLeases, keyvault_pb2.ListLeasesRequest())
    return {lease.instance_id: lease.holder for lease in reply.leases}


def owned_by(ledgers: list[Ledger], placed: dict[str, str], address: str) -> list[Ledger]:
    """The ledgers whose instance the host at `address` holds, in `placed` (see `owners`)."""
    return [ledger for ledger in ledgers if placed[ledger.instance_id] == address]


@dataclass
class Ledger:
    """One token instance, two holders moving 1 back and forth, and what was acknowledged."""

    instance_id: str
    issuer: SigningIdentity
    holders: tuple[SigningIdentity, SigningIdentity]
    acknowledged: int = 0
    acks: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def ledger_errors(ledgers: list[Ledger]) -> list[str]:
    """What the workload's clients failed with, each after its instance id (none, when all is well)."""
    return [f"{ledger.instance_id}: {error}" for ledger in ledgers for error in ledger.errors]


def create_ledgers_on(cluster: Cluster, admin: VeilClient, host: Member) -> tuple[list[Ledger], list[Ledger]]:
    """Four ledgers, four more if rendezvous put none on `host`: all of them, and those on it."""
    ledgers = create_ledgers(admin, 4)
    moved = owned_by(ledgers, owners(cluster), host.address)
    if not moved:  # rendezvous put nothing there: create until something lands on it
        ledgers += create_ledgers(admin, 4)
        placed = owners(cluster)
        moved = owned_by(ledgers, placed, host.address)
        assert moved, placed
    return ledgers, moved


def create_ledgers(admin: VeilClient, count: int) -> list[Ledger]:
    ledgers = []
    for number in range(count):
        issuer = SigningIdentity(ed25519.Ed25519PrivateKey.generate(), "issuer")
        instance_id = f"ledger-{number}"
        admin.create_instance(
            instance_id,
            token_config_for(issuer.public_key),
        )
        holders = (
            SigningIdentity(ed25519.Ed25519PrivateKey.generate()),
            SigningIdentity(ed25519.Ed25519PrivateKey.generate()),
        )
        token = admin.token(instance_id, issuer)
        for holder in holders:
            token.mint(holder.account, INITIAL)
        ledgers.append(Ledger(instance_id, issuer, holders))
    return ledgers


class Workload(Workers):
    """One SDK client thread per ledger, moving 1 between its holders until stopped."""

    def __init__(self, cluster: Cluster, ledgers: list[Ledger]) -> None:
        super().__init__(join_timeout=CLIENT_TIMEOUT_S + 30)
        self._cluster = cluster
        for n, ledger in enumerate(ledgers):
            self.spawn(self._run, ledger, n % cluster.gateways, name=ledger.instance_id)

    def _run(self, ledger: Ledger, gateway: int) -> None:
        try:
            with client(self._cluster, gateway) as sdk:
                turn = 0
                while not self._stop.is_set():
                    sender, receiver = ledger.holders[turn % 2], ledger.holders[(turn + 1) % 2]
                    opened = sdk.execute(ledger.instance_id, transfer(receiver.account, 1), sender)
                    if not opened.accepted or opened.result.HasField("error"):
                        raise RuntimeError(f"transfer refused: {opened.result}")
                    ledger.acknowledged += 1
                    ledger.acks.append(time.monotonic())
                    turn += 1
        except Exception as exc:  # the SDK's GatewayError included: recorded, the test reports it
            ledger.errors.append(f"{type(exc).__name__}: {exc}")


def transfer(to: str, amount: int) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=to, amount=amount)))


def wait_taken_over(
    cluster: Cluster, moved: list[Ledger], old: str, fault: float, timeout: float, ledgers: list[Ledger]
) -> float:
    """Wait until another host holds every moved instance's lease and then acknowledged a
    command of each; returns the longest time from the fault to such an acknowledgement. (An
    acknowledgement that merely arrives after the fault may be the old owner's, sent before.)"""
    deadline = fault + timeout
    while any(owners(cluster).get(ledger.instance_id) == old for ledger in moved):
        assert time.monotonic() < deadline, f"the instances of {old} were not taken over"
        assert not ledger_errors(ledgers)
        time.sleep(0.05)
    moved_at = time.monotonic()
    while any(first_ack_after(ledger, moved_at) is None for ledger in moved):
        assert time.monotonic() < deadline, f"the instances of {old} did not answer at their new owner"
        assert not ledger_errors(ledgers)
        time.sleep(0.05)
    return max(first_ack_after(ledger, moved_at) - fault for ledger in moved)  # type: ignore[operator]


def first_ack_after(ledger: Ledger, moment: float) -> float | None:
    return next((t for t in ledger.acks if t > moment), None)


def log_head(cluster: Cluster, instance_id: str) -> int:
    """The last sequence of the instance's shared log (read from the database: with a host down,
    the gateways' ListInstances fan-out is UNAVAILABLE by design)."""
    query = sql.SQL("SELECT max(sequence) FROM {}.st_entries WHERE instance_id = %s").format(
        sql.Identifier(cluster.schemas["state"])
    )
    with psycopg.connect(cluster.postgres_url) as conn:
        row = conn.execute(query, (instance_id,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def lost_and_duplicated(cluster: Cluster, ledger: Ledger) -> tuple[int, int]:
    """Acknowledged transfers missing from the instance's log, and log entries beyond them."""
    expected = 1 + 2 + ledger.acknowledged  # genesis, two mints, the acknowledged transfers
    head = log_head(cluster, ledger.instance_id)
    return max(0, expected - head), max(0, head - expected)


def balances(admin: VeilClient, ledger: Ledger) -> list[int]:
    return [admin.token(ledger.instance_id, holder).balance() for holder in ledger.holders]


def assert_nothing_lost(cluster: Cluster, admin: VeilClient, ledgers: list[Ledger]) -> None:
    """Every acknowledged transfer is in its instance's log once, and every supply is conserved."""
    for ledger in ledgers:
        assert lost_and_duplicated(cluster, ledger) == (0, 0), ledger.instance_id
        assert sum(balances(admin, ledger)) == 2 * INITIAL


#: Undoes a fault (resumes a paused member, heals a partitioned one).
Undo = Callable[[], None]
#: Cuts a member off (pauses it, partitions it) and returns how to undo that.
Fault = Callable[[Member], Undo]


@dataclass
class SplitBrain:
    """A split brain survived: every ledger, those the fenced-off owner held, how long from the
    fault until each answered at its new owner (the slowest), and when the fault was undone."""

    ledgers: list[Ledger]
    moved: list[Ledger]
    took_over: float
    undone_at: float


def split_brain(cluster: Cluster, admin: VeilClient, fault: Fault) -> SplitBrain:
    """Under load, `fault` cuts off a state host that owns instances; once another host answers
    for them, the fault is undone and the old owner, still running and still believing it owns
    them, is heard from again. Then what must hold after any split brain: no client saw an
    error, the old owner learnt it lost its leases and holds none of them, the keyvault allowed
    no head advance under a superseded fencing token, and nothing acknowledged was lost or
    applied twice."""
    old = cluster.role("state")[1]  # not the default shard (see test_failover)
    ledgers, moved = create_ledgers_on(cluster, admin, old)
    workload = Workload(cluster, ledgers)
    workload.start()
    time.sleep(1.5)
    fault_at = time.monotonic()
    undo = fault(old)
    try:
        took_over = wait_taken_over(cluster, moved, old.address, fault_at, 40, ledgers)
    finally:
        undo()  # the old owner is heard from again, still believing it owns them
    undone_at = time.monotonic()
    time.sleep(3.0)  # its late renewals and held advances reach the keyvault and are refused
    workload.stop()
    assert not ledger_errors(ledgers)
    assert old.process is not None
    assert old.process.poll() is None
    deadline = time.monotonic() + 10
    while "lost instance" not in old.log_path.read_text():
        assert time.monotonic() < deadline, "the old owner never learnt it lost its leases"
        time.sleep(0.2)
    assert all(owners(cluster)[ledger.instance_id] != old.address for ledger in moved)
    assert stale_advances(audit_events(cluster)) == []
    assert_nothing_lost(cluster, admin, ledgers)
    return SplitBrain(ledgers, moved, took_over, undone_at)
