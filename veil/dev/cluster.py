"""`veil up --nodes N`: a local multi-node mesh -- keyvault replicas on one PostgreSQL, N state
hosts as distinct "machines", gateways -- each a supervised process, as on a cluster.

* **keyvault** replicas share one PostgreSQL schema and one KEK file (in production: one HSM),
  so any replica answers any call; state hosts list them all and fail over between them.
* **state** hosts share the encrypted log (one PostgreSQL schema) but each has its own platform
  secret and seal directory, so none can unseal another's key cache: a host that takes an
  instance over obtains its key from the keyvault under its own lease (ownership.py). The
  node name of each host is its address, so a lease names where the instance is served.
* **gateways** know every state host; instances are placed by the gateways' rendezvous hashing.

Ports: member k of a role listens on the role's default ports shifted by `base + 10 * k` (the
roles' ports differ in their last digit, so they never collide). The schemas are unique per
run (`veil_cluster_<tag>_*`) and dropped by `drop_schemas()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from veil.dev.pki import ensure_sim_collateral
from veil.dev.policies import write_dev_enclave_policy, write_dev_policy
from veil.dev.supervisor import (
    MESH_UP,
    Supervised,
    keyvault_pins,
    port_free,
    quiet_offsets,
    sim_mesh_env,
    stop_on_signals,
)
from veil.services.common.channels import wait_until_serving
from veil.services.common.config import (
    ADMIN_LISTEN,
    DATA_DIR,
    DEFAULT_PORTS,
    ENV_GATEWAY_KEYVAULT_ADDR,
    ENV_GATEWAY_PUBLIC_LISTEN,
    ENV_GATEWAY_STATE_ADDRS,
    ENV_GATEWAY_TIMEOUT_SECONDS,
    ENV_KEYVAULT_DB,
    ENV_KEYVAULT_ENCLAVE_POLICY_FILE,
    ENV_KEYVAULT_KEK_FILE,
    ENV_STATE_DB,
    ENV_STATE_DB_SCHEMA,
    ENV_STATE_KEYVAULT_ADDR,
    ENV_STATE_LEASE_TTL_MS,
    ENV_STATE_NODE_NAME,
    ENV_STATE_PLATFORM_SECRET,
    ENV_STATE_SEAL_DIR,
    GRACE_SECONDS,
    LISTEN,
    server_env,
)
from veil.services.gateway.config import DEFAULT_PUBLIC_PORT
from veil.services.keyvault.config import ENV_KEYVAULT_DB_SCHEMA

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: A short lease: a host gone for good is taken over within about this long (plus the replay).
CLUSTER_LEASE_TTL_MS = 2_000
CLUSTER_UPSTREAM_TIMEOUT_S = 5
#: Where cgroup v2 is mounted (alone, or beside v1 as here); partitions match sockets by it.
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
_ROLE_STEP = 10
_log = logging.getLogger("veil.cluster")


def _port(role: str, base: int, index: int, admin: int = 0) -> int:
    return DEFAULT_PORTS[role][admin] + base + _ROLE_STEP * index


@dataclass
class Member(Supervised):
    """One process of the cluster: its role (`name`), its index among that role, its label, and
    the cgroup (v2) it runs in when the cluster can partition it (None: it cannot)."""

    index: int = 0
    label: str = ""
    cgroup: str | None = None

    def start(self) -> None:
        if self.cgroup is None:
            super().start()
            return
        procs = CGROUP2_ROOT / self.cgroup / "cgroup.procs"
        log = self.log_path.open("ab")
        # In its cgroup before it runs anything: every socket it (and its enclave runner) opens
        # is matched by the partition rule (a socket keeps the cgroup it was made in). A shell
        # moves itself, then execs the service: no Python runs between fork and exec (a
        # preexec_fn there aborts the child when gRPC threads are running in this process).
        self.process = subprocess.Popen(  # noqa: S603  # a fixed script; our interpreter and module
            [
                "/bin/sh",
                "-c",
                'echo $$ > "$0" && exec "$@"',
                str(procs),
                sys.executable,
                "-m",
                f"veil.services.{self.name}",
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.started_at = time.monotonic()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS[self.name][0] + self.port_offset}"


@dataclass
class Cluster:
    """The processes of a local multi-node mesh, started in deploy order and supervised."""

    data_dir: Path
    nodes: int = 3
    keyvaults: int = 2
    gateways: int = 2
    base: int = 0
    postgres_url: str = POSTGRES_URL
    lease_ttl_ms: int = CLUSTER_LEASE_TTL_MS
    grace: float = 2.0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    partitions: bool = False
    members: list[Member] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.base:
            self.base = free_cluster_base(self.nodes, self.keyvaults, self.gateways)
        self.schemas = {"state": f"veil_cluster_{self.tag}_state", "keyvault": f"veil_cluster_{self.tag}_kv"}
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ensure_sim_collateral(self.data_dir / "pki")
        common = {
            **sim_mesh_env(self.data_dir),
            ENV_KEYVAULT_ENCLAVE_POLICY_FILE: str(write_dev_enclave_policy(self.data_dir)),
        }
        roles = (("keyvault", self.keyvaults), ("state", self.nodes), ("gateway", self.gateways))
        for role, count in roles:
            for index in range(count):
                label = f"{role}-{index}"
                offset = self.base + _ROLE_STEP * index
                env = {
                    **common,
                    **server_env(
                        role,
                        {
                            DATA_DIR: str(self.data_dir),
                            GRACE_SECONDS: str(self.grace),
                            LISTEN: f"127.0.0.1:{_port(role, self.base, index)}",
                            ADMIN_LISTEN: f"127.0.0.1:{_port(role, self.base, index, 1)}",
                        },
                    ),
                    **self._role_env(role, index),
                }
                member = Member(
                    role, env, logs / f"{label}.log", port_offset=offset, index=index, label=label
                )
                if self.partitions and role == "state":
                    member.cgroup = f"veil-{self.tag}-{label}"
                    (CGROUP2_ROOT / member.cgroup).mkdir()
                self.members.append(member)

    def _role_env(self, role: str, index: int) -> dict[str, str]:
        # Each host prefers another replica first (rotated): every replica writes concurrently.
        replicas = self.addresses("keyvault")
        keyvaults = ",".join(replicas[index % len(replicas) :] + replicas[: index % len(replicas)])
        url = self.postgres_url
        if role == "keyvault":
            return {
                ENV_KEYVAULT_DB: f"{url}?application_name=veil-cluster-{self.tag}-keyvault-{index}",
                ENV_KEYVAULT_DB_SCHEMA: self.schemas["keyvault"],
                ENV_KEYVAULT_KEK_FILE: str(self.data_dir / "keyvault" / "kek.bin"),  # one KEK (an HSM)
            }
        if role == "state":
            machine = self.data_dir / "nodes" / f"state-{index}"  # what one machine keeps to itself
            return {
                ENV_STATE_DB: f"{url}?application_name=veil-cluster-{self.tag}-state-{index}",
                ENV_STATE_DB_SCHEMA: self.schemas["state"],
                ENV_STATE_KEYVAULT_ADDR: keyvaults,
                ENV_STATE_SEAL_DIR: str(machine / "sealed"),
                ENV_STATE_PLATFORM_SECRET: str(machine / "platform.key"),
                ENV_STATE_NODE_NAME: f"127.0.0.1:{_port('state', self.base, index)}",
                ENV_STATE_LEASE_TTL_MS: str(self.lease_ttl_ms),
            }
        return {
            # One address only (the gateway's client has no replica list yet): the last replica.
            ENV_GATEWAY_KEYVAULT_ADDR: self.addresses("keyvault")[-1],
            ENV_GATEWAY_STATE_ADDRS: ",".join(self.addresses("state")),
            ENV_GATEWAY_PUBLIC_LISTEN: f"127.0.0.1:{DEFAULT_PUBLIC_PORT + self.base + _ROLE_STEP * index}",
            # A state host that hangs (paused, cut off) holds a call this long before the
            # gateway looks up where its instances went (the client retries there).
            ENV_GATEWAY_TIMEOUT_SECONDS: str(CLUSTER_UPSTREAM_TIMEOUT_S),
        }

    def addresses(self, role: str) -> list[str]:
        count = {"keyvault": self.keyvaults, "state": self.nodes, "gateway": self.gateways}[role]
        return [f"127.0.0.1:{_port(role, self.base, i)}" for i in range(count)]

    def role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.name == role]

    def member(self, label: str) -> Member:
        return next(m for m in self.members if m.label == label)

    @property
    def gateway(self) -> str:
        return self.addresses("gateway")[0]

    # -- running ------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start each role's members together, role after role, each SERVING before the next role."""
        for role in ("keyvault", "state", "gateway"):
            members = self.role(role)
            if role == "keyvault":
                # The first replica creates the deployment's release key and signing keys; the
                # others load them (creation is race-free, but serial start-up is quicker here).
                members[0].start()
                self.wait_serving(members[0], timeout)
                members = members[1:]
            for member in members:
                member.start()
            for member in members:
                self.wait_serving(member, timeout)
            _log.info("%s: %d SERVING", role, len(self.role(role)))
        pins = keyvault_pins(self.data_dir, self.base)  # (replica 0: the base's keyvault port)
        write_dev_policy(self.data_dir, pins.release_key, pins.jwks)

    def wait_serving(self, member: Member, timeout: float = 60.0) -> None:
        try:
            wait_until_serving(
                member.admin_address,
                label=member.label,
                timeout=timeout,
                interval=0.05,
                gave_up=member.exit_reason,
            )
        except TimeoutError as exc:
            raise TimeoutError(
                f"{member.label} did not become SERVING: {exc}; see {member.log_path}"
            ) from exc

    def kill9(self, member: Member) -> None:
        """SIGKILL a member (no drain) and its enclave runner: a machine gone at once."""
        assert member.process is not None
        runners = _children(member.process.pid)
        member.process.send_signal(signal.SIGKILL)
        member.process.wait(10)
        for pid in runners:
            _kill_quietly(pid, signal.SIGKILL)

    def pause(self, member: Member) -> list[int]:
        """SIGSTOP a member and its enclave runner (a VM paused, a process descheduled)."""
        assert member.process is not None
        pids = [member.process.pid, *_children(member.process.pid)]
        for pid in pids:
            _kill_quietly(pid, signal.SIGSTOP)
        return pids

    def resume(self, pids: list[int]) -> None:
        for pid in pids:
            _kill_quietly(pid, signal.SIGCONT)

    def cut(self, member: Member) -> None:
        """Partition a state host: every packet it sends (to the keyvaults, the database, its
        answers to the gateways) is dropped, while it keeps running and believing it serves."""
        self._iptables("-I", member)

    def heal(self, member: Member) -> None:
        self._iptables("-D", member)

    def _iptables(self, action: str, member: Member) -> None:
        assert member.cgroup is not None, "start the cluster with partitions=True"
        rule = ["OUTPUT", "-m", "cgroup", "--path", member.cgroup, "-j", "DROP"]
        subprocess.run(["iptables", action, *rule], check=True, capture_output=True)  # noqa: S603, S607

    def watch(self, poll: float = 0.5) -> None:
        """Restart members that exit (`veil up --nodes`): at once, as the single mesh does."""
        while not self._stopping.wait(poll):
            for member in self.members:
                if member.process is not None and member.process.poll() is not None:
                    _log.warning("%s exited with %s; restarting", member.label, member.process.returncode)
                    member.start()

    def stop(self) -> None:
        self._stopping.set()
        for role in ("gateway", "state", "keyvault"):
            for member in self.role(role):
                if member.cgroup is not None:
                    with contextlib.suppress(subprocess.CalledProcessError):
                        while True:  # every cut of it (a test may have cut it twice)
                            self.heal(member)
                member.stop(self.grace)
        for member in self.members:
            if member.cgroup is not None:
                with contextlib.suppress(OSError):
                    (CGROUP2_ROOT / member.cgroup).rmdir()

    def drop_schemas(self) -> None:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            for schema in self.schemas.values():
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def partitions_unavailable() -> str | None:
    """Why this machine cannot partition a process (None: it can): cgroup v2 and iptables'
    cgroup match are needed, as root."""
    if os.geteuid() != 0:
        return "partitions need root (iptables)"
    if not (CGROUP2_ROOT / "cgroup.procs").exists():
        return f"no cgroup v2 at {CGROUP2_ROOT}"
    if shutil.which("iptables") is None:
        return "iptables is not installed"
    return None


def free_cluster_base(nodes: int, keyvaults: int, gateways: int) -> int:
    """A base whose every cluster port is free now, below the ephemeral range (`quiet_offsets`)."""

    def ports(base: int) -> list[int]:
        return [
            _port(role, base, i, admin)
            for role, count in (("keyvault", keyvaults), ("state", nodes), ("gateway", gateways))
            for i in range(count)
            for admin in (0, 1)
        ] + [DEFAULT_PUBLIC_PORT + base + _ROLE_STEP * i for i in range(gateways)]

    for base in quiet_offsets(ports(0)):
        if all(port_free(port) for port in ports(base)):
            return base
    raise OSError("no free port base for a cluster")


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task")
        return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]
    except OSError:
        return []


def _kill_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def up_cluster(data_dir: Path, nodes: int, base: int = 0) -> int:
    """Run a cluster in the foreground until SIGINT/SIGTERM; its schemas are dropped at the end."""
    cluster = Cluster(data_dir, nodes=nodes, base=base)

    stop_on_signals(cluster._stopping, "the cluster", _log)
    try:
        try:
            started = time.monotonic()
            cluster.start()
        except TimeoutError as exc:
            _log.error("%s", exc)
            return 1
        print(
            f"{MESH_UP}: gateways at {', '.join(cluster.addresses('gateway'))}; "
            f"{nodes} state hosts, {cluster.keyvaults} keyvault replicas on PostgreSQL "
            f"(schemas {', '.join(cluster.schemas.values())}); up in {time.monotonic() - started:.1f}s",
            flush=True,
        )
        print(f"  logs: {data_dir / 'logs'}  (the enclave is SIMULATED)", flush=True)
        cluster.watch()
        return 0
    finally:
        cluster.stop()
        cluster.drop_schemas()
