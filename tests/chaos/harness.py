"""Chaos: kill -9 the services of a real mesh under load, then prove nothing acknowledged was lost.

The mesh is `veil up`'s own (veil.dev.supervisor.Mesh: keyvault -> state -> gateway as real
processes, sim enclave) on a free port offset, so it runs beside any other mesh. The harness
does the supervising itself: it SIGKILLs one service at a time (state, keyvault, gateway in
turn; in the PostgreSQL run also every database session of the state and the keyvault, with
`pg_terminate_backend`), restarts a killed process at once (as Kubernetes restarts a crashed
container) and measures the time from the kill to SERVING again, and the longest pause in
acknowledgements the clients saw from the fault on.

Meanwhile SDK clients work through the gateway: token holders transfer random amounts to
each other, voters vote once each on a ballot. The SDK retries a failed call with the same
request (same request_id, same sealed bytes) until its deadline, and seals a command again
when a restarted enclave cannot open it (it was never executed), so every command ends with
a known fate: acknowledged (with a verified receipt) or an error. At the end:

* every holder's balance is exactly what its acknowledged transfers imply, and the supply is
  conserved: no acknowledged transfer lost, none applied twice;
* each instance's log holds exactly its acknowledged commands: nothing unacknowledged was
  applied, even half (`lost` counts acknowledged commands missing from it, `extra` the others);
* the closed ballot counts exactly the acknowledged votes, option by option.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from cryptography.hazmat.primitives.asymmetric import ed25519
from psycopg import sql

from tests.admin_client import admin_client
from tests.workers import Workers
from veil.dev.loadclient import token_config_for
from veil.dev.pki import init_pki
from veil.dev.policies import write_dev_policy
from veil.dev.supervisor import Mesh, Supervised, free_port_offset, keyvault_pins
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.sdk.client import VeilClient
from veil.sdk.errors import GatewayError
from veil.sdk.identity import AnonymousIdentity, Identity, SigningIdentity
from veil.services.common.channels import wait_until_serving
from veil.services.common.config import (
    DEFAULT_PORTS,
    ENV_GATEWAY_BURST,
    ENV_GATEWAY_RATE,
    ENV_KEYVAULT_DB,
    ENV_STATE_DB,
    ENV_STATE_DB_SCHEMA,
)
from veil.services.keyvault.config import ENV_KEYVAULT_DB_SCHEMA

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
TOKENS = "chaos-tokens"
BALLOTS = "chaos-ballots"
BALLOT = "q1"
OPTIONS = ("yes", "no", "abstain")
INITIAL = 1_000
CLIENT_TIMEOUT_S = 120.0  # the SDK retries a call until this deadline: far above any recovery
RECOVERY_TIMEOUT_S = 120.0
UNLIMITED = "1000000"
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(f"chaos: {message}", flush=True)


# --- the mesh ------------------------------------------------------------------------------


class ChaosMesh:
    """`veil up`'s mesh on a free port offset, killed and restarted by the harness."""

    def __init__(self, workdir: Path, *, postgres: bool) -> None:
        self.data_dir = workdir / ".veil"
        init_pki(self.data_dir / "pki")
        self.offset = free_port_offset()
        self.postgres = postgres
        tag = uuid.uuid4().hex[:10]
        self.schemas = {"state": f"veil_chaos_{tag}_state", "keyvault": f"veil_chaos_{tag}_keyvault"}
        # application_name marks our sessions, so only they are terminated (others share the server).
        self.applications = {name: f"veil-chaos-{tag}-{name}" for name in self.schemas}
        self.mesh = Mesh(self.data_dir, grace=2.0, port_offset=self.offset)
        for service in self.mesh.services:
            # The limiter (one bucket per principal, and every client here is the admin) is not
            # under test: left at 200/s, its retry hints would be the pauses measured.
            service.env.update({ENV_GATEWAY_RATE: UNLIMITED, ENV_GATEWAY_BURST: UNLIMITED})
        if postgres:
            database = {
                ENV_STATE_DB: f"{POSTGRES_URL}?application_name={self.applications['state']}",
                ENV_STATE_DB_SCHEMA: self.schemas["state"],
                ENV_KEYVAULT_DB: f"{POSTGRES_URL}?application_name={self.applications['keyvault']}",
                ENV_KEYVAULT_DB_SCHEMA: self.schemas["keyvault"],
            }
            for service in self.mesh.services:
                service.env.update(database)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS['gateway'][0] + self.offset}"

    def service(self, name: str) -> Supervised:
        return next(s for s in self.mesh.services if s.name == name)

    def start(self) -> None:
        self.mesh.start()
        # As `veil up` does: clients pin this checkout's sim enclave and this keyvault.
        pins = keyvault_pins(self.data_dir, self.offset)
        write_dev_policy(self.data_dir, pins.release_key, pins.jwks)

    def stop(self) -> None:
        self.mesh.stop()
        if self.postgres:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                for schema in self.schemas.values():
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def kill9(self, name: str) -> None:
        """SIGKILL the service (no drain); the state's enclave runner dies of EOF on its pipe."""
        service = self.service(name)
        assert service.process is not None
        children = _children(service.process.pid)
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)
        for pid in children:
            _wait_gone(pid)

    def restart(self, name: str) -> None:
        self.service(name).start()

    def wait_serving(self, name: str) -> None:
        service = self.service(name)
        wait_until_serving(
            service.admin_address,
            label=name,
            timeout=RECOVERY_TIMEOUT_S,
            interval=0.05,
            gave_up=service.exit_reason,
        )

    def terminate_sessions(self) -> int:
        """pg_terminate_backend every database session of the state and the keyvault."""
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY(%s)",
                (list(self.applications.values()),),
            ).fetchall()
        return len(rows)

    def connect(self) -> VeilClient:
        """An SDK client with the admin certificate (verifies the enclave first)."""
        return admin_client(self.gateway, self.data_dir, CLIENT_TIMEOUT_S)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        tasks = Path(f"/proc/{pid}/task")
        return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]
    return []


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        with contextlib.suppress(OSError):
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return  # exited; its parent is gone, so init reaps it
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # our own enclave runner, by its pid
            return
        time.sleep(0.05)


@contextlib.contextmanager
def chaos_mesh(workdir: Path, *, postgres: bool) -> Iterator[ChaosMesh]:
    mesh = ChaosMesh(workdir, postgres=postgres)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


# --- the load ------------------------------------------------------------------------------


@dataclass
class Holder:
    """A token account and the fate of its commands."""

    identity: SigningIdentity
    sent: dict[str, int] = field(default_factory=dict)  # receiver -> amount acknowledged as moved
    logged: int = 0  # acknowledged commands (each is one log entry, refused overdrafts included)


@dataclass
class Tally:
    """What the workload saw acknowledged, and what went wrong."""

    votes: list[int] = field(default_factory=lambda: [0] * len(OPTIONS))
    acks: list[float] = field(default_factory=list)  # monotonic times of acknowledgements
    unresolved: list[str] = field(default_factory=list)  # fate unknown after the SDK's deadline
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.acks.append(now)

    def failed(self, what: str, exc: BaseException) -> None:
        with self.lock:
            if isinstance(exc, GatewayError) and exc.code in _TRANSIENT:
                self.unresolved.append(f"{what}: {exc}")
            else:
                self.errors.append(f"{what}: {type(exc).__name__}: {exc}")


def _transfer(to: str, amount: int) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=to, amount=amount)))


def _vote(option: int) -> apps_pb2.AppCall:
    vote = apps_pb2.BallotVote(ballot_id=BALLOT, option=option, salt=secrets.token_bytes(32))
    return apps_pb2.AppCall(ballot=apps_pb2.BallotCall(vote=vote))


class Workload(Workers):
    """Token holders and voters, one SDK client (own channel) per thread, until stopped."""

    def __init__(self, mesh: ChaosMesh, holders: list[Holder], voter_threads: int) -> None:
        super().__init__(join_timeout=CLIENT_TIMEOUT_S + 30)
        self.holders = holders
        self.tally = Tally()
        self._mesh = mesh
        for i, holder in enumerate(holders):
            self.spawn(self._holder, holder, name=f"holder-{i}")
        for thread in range(voter_threads):
            self.spawn(self._voter, thread, name=f"voter-{thread}")

    def _holder(self, holder: Holder) -> None:
        rng = random.Random(holder.identity.account)
        others = [h.identity.account for h in self.holders if h is not holder]
        try:
            with self._mesh.connect() as client:
                while not self._stop.is_set():
                    to, amount = rng.choice(others), rng.randint(1, 40)
                    opened = client.execute(TOKENS, _transfer(to, amount), holder.identity)
                    if not opened.accepted:
                        raise RuntimeError(f"transfer not accepted: {opened.result}")
                    holder.logged += 1
                    self.tally.ack()
                    if not opened.result.HasField("error"):  # an overdraft is refused, and logged
                        holder.sent[to] = holder.sent.get(to, 0) + amount
        except Exception as exc:
            self.tally.failed(f"holder {holder.identity.account[:8]}", exc)

    def _voter(self, thread: int) -> None:
        rng = random.Random(thread)
        try:
            with self._mesh.connect() as client:
                for number in range(10**9):
                    if self._stop.is_set():
                        return
                    voter: Identity = AnonymousIdentity(f"voter-{thread}-{number}")
                    option = rng.randrange(len(OPTIONS))
                    opened = client.execute(BALLOTS, _vote(option), voter)
                    if not opened.accepted or opened.result.HasField("error"):
                        raise RuntimeError(f"vote refused: {opened.result}")
                    with self.tally.lock:
                        self.tally.votes[option] += 1
                    self.tally.ack()
        except Exception as exc:
            self.tally.failed(f"voter thread {thread}", exc)


# --- events --------------------------------------------------------------------------------


@dataclass
class Event:
    """One fault: what was hit, when, and how long until the mesh served again."""

    target: str  # "state", "keyvault", "gateway" or "database"
    at_s: float  # seconds into the run
    serving_s: float | None = None  # kill (or termination) to the target SERVING again
    pause_s: float | None = None  # the longest time without any acknowledgement, from the fault on
    detail: str = ""


def _inject(mesh: ChaosMesh, target: str, started: float) -> tuple[Event, float]:
    """Hit `target`, bring it back, and time it; returns the event and its monotonic time."""
    at = time.monotonic()
    event = Event(target, round(at - started, 2))
    if target == "database":
        event.detail = f"{mesh.terminate_sessions()} sessions terminated"
        for name in ("keyvault", "state"):  # each reconnects; the state may recover in-process
            mesh.wait_serving(name)
    else:
        mesh.kill9(target)
        mesh.restart(target)
        mesh.wait_serving(target)
    event.serving_s = round(time.monotonic() - at, 3)
    return event, at


# --- the run -------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    """The outcome: what was acknowledged, what was lost, how fast each fault was recovered."""

    backend: str
    seconds: float
    transfers: int = 0
    votes: int = 0
    lost: int = 0
    extra: int = 0
    balance_mismatches: list[str] = field(default_factory=list)
    supply: int = 0
    expected_supply: int = 0
    tally: list[int] = field(default_factory=list)
    acknowledged_votes: list[int] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def acknowledged(self) -> int:
        return self.transfers + self.votes

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.extra == 0
            and not self.balance_mismatches
            and self.supply == self.expected_supply
            and self.tally == self.acknowledged_votes
            and not self.unresolved
            and not self.errors
            and all(e.serving_s is not None for e in self.events)
        )

    def to_json(self) -> dict[str, Any]:
        """Every field (each event as an object), the acknowledged total and the verdict."""
        return {**asdict(self), "acknowledged": self.acknowledged, "ok": self.ok}

    def summary(self) -> str:
        lines = [
            f"backend {self.backend}, {self.seconds:.0f}s of load, {len(self.events)} faults",
            f"acknowledged {self.acknowledged} ({self.transfers} transfers, {self.votes} votes)",
            f"lost {self.lost}   applied without acknowledgement {self.extra}   "
            f"unresolved {len(self.unresolved)}   errors {len(self.errors)}",
            f"supply {self.supply} (expected {self.expected_supply}); balance mismatches "
            f"{len(self.balance_mismatches)}; tally {self.tally} (acknowledged {self.acknowledged_votes})",
            "fault        at (s)   SERVING again (s)   longest pause in acks (s)   detail",
        ]
        for e in self.events:
            lines.append(
                f"{e.target:<12} {e.at_s:>6.1f}   {_fmt(e.serving_s):>17}   "
                f"{_fmt(e.pause_s):>25}   {e.detail}"
            )
        lines += [f"unresolved: {u}" for u in self.unresolved] + [f"error: {e}" for e in self.errors]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def _longest_pause(acks: list[float], start: float, end: float) -> float | None:
    """The longest gap between acknowledgements within [start, end], counted from `start`: what
    clients saw of a fault (None if nothing was acknowledged after it)."""
    times = sorted(t for t in acks if start < t <= end)
    if not times:
        return None
    gaps = [b - a for a, b in zip([start, *times], times, strict=False)]
    return round(max(gaps), 3)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class ChaosOptions:
    """How long, how hard, how often."""

    seconds: float = 180.0
    postgres: bool = False
    interval: float = 8.0  # seconds of load between a recovery and the next fault
    holders: int = 8
    voter_threads: int = 4
    warmup: float = 3.0


def _setup(admin: VeilClient, holders: int) -> tuple[SigningIdentity, list[Holder], AnonymousIdentity]:
    issuer = SigningIdentity(ed25519.Ed25519PrivateKey.generate(), "issuer")
    admin.create_instance(
        TOKENS,
        token_config_for(issuer.public_key),
    )
    admin.create_instance(
        BALLOTS,
        envelope_pb2.InstanceConfig(
            app=envelope_pb2.APP_KIND_BALLOT,
            auth_scheme=envelope_pb2.AUTH_SCHEME_NONE,
            ballot_min_votes=1,  # the check is an exact count, however few votes a run acknowledges
        ),
    )
    accounts = [Holder(SigningIdentity(ed25519.Ed25519PrivateKey.generate())) for _ in range(holders)]
    token = admin.token(TOKENS, issuer)
    for holder in accounts:
        token.mint(holder.identity.account, INITIAL)
    clerk = AnonymousIdentity("clerk")
    admin.ballot(BALLOTS, clerk).create(BALLOT, "Ship it?", OPTIONS)
    return issuer, accounts, clerk


def _verify(
    admin: VeilClient,
    report: ChaosReport,
    workload: Workload,
    issuer: SigningIdentity,
    clerk: AnonymousIdentity,
) -> None:
    holders = workload.holders
    for holder in holders:
        account = holder.identity.account
        received = sum(h.sent.get(account, 0) for h in holders)
        expected = INITIAL - sum(holder.sent.values()) + received
        actual = admin.token(TOKENS, holder.identity).balance()
        if actual != expected:
            report.balance_mismatches.append(f"{account[:8]}: balance {actual}, acknowledged {expected}")
    report.supply = admin.token(TOKENS, issuer).total_supply()
    report.expected_supply = INITIAL * len(holders)
    heads = {i.instance_id: i.sequence for i in admin.list_instances()}
    expected_heads = {
        TOKENS: 1 + len(holders) + report.transfers,  # genesis, mints, acknowledged transfers
        BALLOTS: 1 + 1 + report.votes,  # genesis, create, acknowledged votes
    }
    for instance, expected_head in expected_heads.items():
        report.lost += max(0, expected_head - heads[instance])
        report.extra += max(0, heads[instance] - expected_head)
    report.tally = list(admin.ballot(BALLOTS, clerk).close(BALLOT).counts)
    report.acknowledged_votes = list(workload.tally.votes)


def run_chaos(workdir: Path, options: ChaosOptions, log: Log = _print) -> ChaosReport:
    """Start a mesh in `workdir`, load it, inject faults for `options.seconds`, verify, stop."""
    backend = "postgresql" if options.postgres else "sqlite"
    report = ChaosReport(backend, options.seconds)
    targets = ["state", "keyvault", "gateway"] + (["database"] if options.postgres else [])
    with chaos_mesh(workdir, postgres=options.postgres) as mesh:
        log(f"mesh up ({backend}) at {mesh.gateway}")
        with mesh.connect() as admin:
            issuer, holders, clerk = _setup(admin, options.holders)
            workload = Workload(mesh, holders, options.voter_threads)
            workload.start()
            started = time.monotonic()
            injected: list[float] = []
            try:
                time.sleep(options.warmup)
                while time.monotonic() - started < options.seconds:
                    target = targets[len(report.events) % len(targets)]
                    try:
                        event, at = _inject(mesh, target, started)
                    except TimeoutError as exc:  # not back: recorded (fails the run), no further faults
                        report.events.append(
                            Event(target, round(time.monotonic() - started, 2), detail=str(exc))
                        )
                        injected.append(time.monotonic())
                        log(f"{target}: did not recover: {exc}")
                        break
                    log(f"{target}: SERVING again after {event.serving_s:.2f}s {event.detail}".rstrip())
                    report.events.append(event)
                    injected.append(at)
                    time.sleep(options.interval)
            finally:
                workload.stop()
            for event, at in zip(report.events, injected, strict=True):
                event.pause_s = _longest_pause(workload.tally.acks, at, at + (event.serving_s or 0) + 5)
            report.transfers = sum(h.logged for h in holders)
            report.votes = sum(workload.tally.votes)
            report.unresolved = list(workload.tally.unresolved)
            report.errors = list(workload.tally.errors)
            if not report.unresolved:  # with a command of unknown fate the books cannot balance
                _verify(admin, report, workload, issuer, clerk)
    return report
