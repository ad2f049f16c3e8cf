"""`veil up`: start keyvault → state → gateway as processes, each after the previous is SERVING.

Like Kubernetes, the supervisor restarts a service that dies (at once after a healthy run,
with back-off only in a crash loop) and
stops everything, gateway first, on SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from veil.cli.common import DEFAULT_DATA_DIR, ENV_DATA_DIR, ENV_GATEWAY
from veil.dev.pki import admin_tls, collateral_dir, ensure_admin_ca, ensure_sim_collateral
from veil.dev.policies import write_dev_enclave_policy, write_dev_policy
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.channels import call, health_status, secure_channel, wait_until_serving
from veil.services.common.config import (
    ADMIN_LISTEN,
    DATA_DIR,
    DEFAULT_PORTS,
    ENV_GATEWAY_BURST,
    ENV_GATEWAY_KEYVAULT_ADDR,
    ENV_GATEWAY_PUBLIC_LISTEN,
    ENV_GATEWAY_RATE,
    ENV_GATEWAY_STATE_ADDRS,
    ENV_KEYVAULT_ATTESTATION_ROOT,
    ENV_KEYVAULT_ENCLAVE_POLICY_FILE,
    ENV_STATE_ENCLAVE_MODE,
    ENV_STATE_KEYVAULT_ADDR,
    GRACE_SECONDS,
    LISTEN,
    server_env,
)
from veil.services.gateway.config import DEFAULT_PUBLIC_PORT
from veil.services.keyvault.config import ENV_KEYVAULT_COLLATERAL_DIR

DEPLOY_ORDER = ("keyvault", "state", "gateway")
#: The local mesh's per-client rate limit (production default: 200/s, burst 400). A dev mesh
#: listens on loopback only and is what `veil bench` measures: the limiter still runs on every
#: request, at a rate no benchmark of two cores reaches. VEIL_GATEWAY_RATE/BURST still override.
DEV_GATEWAY_RATE = "20000"
DEV_GATEWAY_BURST = "20000"
#: How `veil up` says, on stdout, that every service is SERVING and the client policy written.
MESH_UP = "veil mesh is up"
_log = logging.getLogger("veil.up")


def stop_on_signals(stopping: threading.Event, what: str, log: logging.Logger) -> None:
    """SIGINT and SIGTERM set `stopping`, so that a foreground `veil up` or cluster stops `what`."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping %s", signal.Signals(signum).name, what)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def sim_mesh_env(data_dir: Path) -> dict[str, str]:
    """What the services of a local mesh run with: the simulated enclave, whose quotes chain to
    the dev SGX root and whose TCB the keyvault evaluates against the dev PKI's collateral for
    the sim platform, and the dev gateway rate. Explicit here: the services themselves default to
    failing closed."""
    return {
        ENV_STATE_ENCLAVE_MODE: "sim",
        ENV_KEYVAULT_ATTESTATION_ROOT: "dev",
        ENV_KEYVAULT_COLLATERAL_DIR: str(collateral_dir(data_dir / "pki")),
        ENV_GATEWAY_RATE: DEV_GATEWAY_RATE,
        ENV_GATEWAY_BURST: DEV_GATEWAY_BURST,
    }


@dataclass
class Supervised:
    """One service process and its restart bookkeeping."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    port_offset: int = 0

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS[self.name][1] + self.port_offset}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603  # our own interpreter and module, no shell
            [sys.executable, "-m", f"veil.services.{self.name}"],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.started_at = time.monotonic()

    def exit_reason(self) -> str | None:
        """Why the process is gone, or None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        reason = f"process exited with status {self.process.returncode}"
        last = self.last_log_line()
        return f"{reason} (its log's last line: {last})" if last else reason

    def last_log_line(self) -> str:
        """The log's last non-empty line (a failed start's error), so a report needs no log access."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def stop(self, grace: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace + 5)
        except subprocess.TimeoutExpired:
            _log.warning("%s did not stop within %.0fs; killing it", self.name, grace + 5)
            self.process.kill()
            self.process.wait()


def _answers(address: str) -> bool:
    try:
        health_status(address, timeout=0.5)
    except grpc.RpcError:
        return False
    return True


class Mesh:
    """The three services of a local mesh under one supervisor."""

    def __init__(
        self, data_dir: Path, *, startup_timeout: float = 120.0, grace: float = 5.0, port_offset: int = 0
    ):
        self.data_dir = data_dir
        self.port_offset = port_offset
        self.startup_timeout = startup_timeout
        self.grace = grace
        self._stopping = threading.Event()
        log_dir = data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **sim_mesh_env(data_dir),
            **os.environ,
            # The keyvault releases instance keys (and accepts commit heads) only for the sim
            # enclave built from this checkout: the operator policy a production keyvault reads
            # from its ConfigMap.
            ENV_KEYVAULT_ENCLAVE_POLICY_FILE: str(write_dev_enclave_policy(data_dir)),
        }
        self.services = [
            Supervised(
                n,
                {
                    **env,
                    **server_env(n, {DATA_DIR: str(data_dir), GRACE_SECONDS: str(grace)}),
                    **port_env(n, port_offset),
                },
                log_dir / f"{n}.log",
                port_offset=port_offset,
            )
            for n in DEPLOY_ORDER
        ]

    def start(self) -> None:
        """Start in deploy order; TimeoutError names the service that did not come up."""
        for service in self.services:
            if _answers(service.admin_address):
                self.stop()
                raise TimeoutError(
                    f"{service.name} did not come up: {service.admin_address} is already in use "
                    "(is another mesh running?)"
                )
            _log.info("starting %s", service.name)
            service.start()
            try:
                wait_until_serving(
                    service.admin_address,
                    label=service.name,
                    timeout=self.startup_timeout,
                    gave_up=service.exit_reason,
                )
            except TimeoutError as exc:
                self.stop()
                raise TimeoutError(
                    f"{service.name} did not become SERVING: {exc}; see {service.log_path}"
                ) from exc
            _log.info("%s is SERVING (admin %s)", service.name, service.admin_address)

    def watch(self, poll: float = 0.5) -> None:
        """Restart exited services (at once after a healthy run, with back-off only in a crash
        loop: see restart_delay) until stop() is called."""
        while not self._stopping.wait(poll):
            for service in self.services:
                process = service.process
                if process is None or process.poll() is None:
                    continue
                delay, service.restarts = restart_delay(
                    service.restarts, time.monotonic() - service.started_at
                )
                _log.warning(
                    "%s exited with %s; restarting in %.1fs (restart %d of this crash loop)",
                    service.name,
                    process.returncode,
                    delay,
                    service.restarts,
                )
                if self._stopping.wait(delay):
                    return
                service.start()

    def stop(self) -> None:
        """Stop every service, gateway first (reverse deploy order)."""
        self._stopping.set()
        for service in reversed(self.services):
            service.stop(self.grace)


#: A run at least this long was healthy: its exit starts no crash loop (Kubernetes resets its
#: CrashLoopBackOff after 10 minutes of running; a dev mesh's services start in seconds).
HEALTHY_RUN_S = 60.0
RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0


def restart_delay(restarts: int, ran_s: float) -> tuple[float, int]:
    """How long to wait before restarting a service that exited after running `ran_s` seconds,
    `restarts` being the quick exits before this one: (delay, the new count).

    The healthy-run reset comes first: a service killed after a healthy run restarts at once
    (the old order computed the delay from the previous loop's count, so a gateway killed after
    a healthy hour still waited up to 30 s). Only exits in quick succession back off, doubling
    from 0.5 s to 30 s.
    """
    if ran_s >= HEALTHY_RUN_S:
        return 0.0, 0
    delay = (
        0.0 if restarts == 0 else min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_INITIAL_S * 2 ** (restarts - 1))
    )
    return delay, restarts + 1


def port_env(service: str, offset: int) -> dict[str, str]:
    """Addresses for a mesh shifted by `offset` ports (none for the default ports), so a second
    mesh (`make bench`, a test) can run beside `make run`."""
    if not offset:
        return {}

    def address(name: str, admin: int = 0) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS[name][admin] + offset}"

    env = server_env(service, {LISTEN: address(service), ADMIN_LISTEN: address(service, 1)})
    if service == "state":
        env[ENV_STATE_KEYVAULT_ADDR] = address("keyvault")
    if service == "gateway":
        env[ENV_GATEWAY_KEYVAULT_ADDR] = address("keyvault")
        env[ENV_GATEWAY_STATE_ADDRS] = address("state")
        env[ENV_GATEWAY_PUBLIC_LISTEN] = f"127.0.0.1:{DEFAULT_PUBLIC_PORT + offset}"
    return env


def mesh_ports(offset: int) -> list[int]:
    """Every port a mesh at `offset` listens on."""
    ports = [port for pair in DEFAULT_PORTS.values() for port in pair] + [DEFAULT_PUBLIC_PORT]
    return [port + offset for port in ports]


def free_port_offset() -> int:
    """An offset whose ports are all free now, below the ephemeral range (`quiet_offsets`).
    Multiples of 100 never overlap each other: a mesh's ports differ only in their last digits."""
    for offset in quiet_offsets(mesh_ports(0)):
        if all(port_free(port) for port in mesh_ports(offset)):
            return offset
    raise OSError("no free port offset for a second mesh")


#: Linux's default first ephemeral port, where /proc does not say.
_EPHEMERAL_FLOOR_DEFAULT = 32768
_LOWEST_PORT = 1024


def quiet_offsets(ports: list[int], *, count: int = 40) -> list[int]:
    """Port shifts (multiples of 100) that move every one of `ports` below the kernel's
    ephemeral range. The default ports sit inside it, so any outgoing connection (even
    the mesh's own, to PostgreSQL or a peer) can take one between a free-port check and the bind:
    a CI run failed that way. Below the range only a listener can hold a port, and the check
    sees listeners."""
    try:
        floor = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        floor = _EPHEMERAL_FLOOR_DEFAULT
    top = (floor - 1 - max(ports)) // 100 * 100
    below = [top - 100 * k for k in range(count) if min(ports) + top - 100 * k > _LOWEST_PORT]
    return below or list(range(100, 100 * (count + 1), 100))  # (a range from ~1024: shift up)


def port_free(port: int, *, as_servers_bind: bool = False) -> bool:
    """Whether 127.0.0.1:`port` can be bound now. `as_servers_bind`: with SO_REUSEADDR, as the
    services bind (a closed connection's TIME_WAIT then does not count); without it the probe
    is stricter, for picking ports that must stay free a while."""
    with socket.socket() as probe:
        if as_servers_bind:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class KeyvaultPins:
    """What clients of the local mesh pin of its keyvault: the release key and the token JWKS."""

    release_key: bytes
    jwks: dict[str, Any]


def keyvault_pins(data_dir: Path, port_offset: int = 0) -> KeyvaultPins:
    """The local keyvault's release-signing public key and JWKS, asked for with the admin identity."""
    address = f"127.0.0.1:{DEFAULT_PORTS['keyvault'][0] + port_offset}"
    with secure_channel(address, admin_tls(data_dir / "pki")) as channel:
        reply = call(keyvault_pb2_grpc.KeyvaultServiceStub(channel).GetJwks, keyvault_pb2.GetJwksRequest())
    jwks = json.loads(reply.jwks_json)
    if not isinstance(jwks, dict):
        raise ValueError("the keyvault's GetJwks answer is not a JWKS object")
    return KeyvaultPins(release_key=bytes(reply.release_public_key), jwks=jwks)


def keyvault_release_key(data_dir: Path, port_offset: int = 0) -> bytes:
    """The local keyvault's release-signing public key, asked for with the admin identity."""
    return keyvault_pins(data_dir, port_offset).release_key


def client_exports(data_dir: Path, port_offset: int) -> str:
    """What a shell exports for `veil` commands to reach this mesh ("" for the defaults): its
    gateway when the ports moved, its data dir (pinned measurement, PKI) when it is not .veil."""
    exports = []
    if port_offset:
        exports.append(f"{ENV_GATEWAY}=127.0.0.1:{DEFAULT_PORTS['gateway'][0] + port_offset}")
    if data_dir.resolve() != DEFAULT_DATA_DIR.resolve():
        exports.append(f"{ENV_DATA_DIR}={shlex.quote(str(data_dir))}")
    return " ".join(exports)


def up(data_dir: Path, port_offset: int = 0) -> int:
    """Run the mesh in the foreground until SIGINT/SIGTERM."""
    if ensure_admin_ca(data_dir / "pki"):
        _log.info("the dev PKI had no admin CA: wrote one and a new admin certificate from it")
    if ensure_sim_collateral(data_dir / "pki"):
        # A dev PKI from before dev collateral: the keyvault would refuse every sim quote.
        _log.info("the dev PKI had no sim collateral: wrote a new sim SGX chain with its collateral")
    mesh = Mesh(data_dir, port_offset=port_offset)

    stop_on_signals(mesh._stopping, "the mesh", _log)
    try:
        mesh.start()
    except TimeoutError as exc:
        _log.error("%s", exc)
        return 1
    # Clients pin the sim enclave built from this checkout and the keyvault that releases its
    # keys and signs its tokens (no trust on first use): the release key and the JWKS are read
    # from the keyvault itself, over mTLS. The pinned JWKS is what makes the token's TCB status
    # trustworthy: without it the gateway would deliver the key that verifies the token.
    pins = keyvault_pins(data_dir, port_offset)
    write_dev_policy(data_dir, pins.release_key, pins.jwks)
    public = f"127.0.0.1:{DEFAULT_PUBLIC_PORT + port_offset}"
    print(
        f"{MESH_UP}: gateway at 127.0.0.1:{DEFAULT_PORTS['gateway'][0] + port_offset} (mutual TLS; "
        f"clients without a certificate, e.g. the Node client: {public})",
        flush=True,
    )
    print(f"  pki: {data_dir / 'pki'}  logs: {data_dir / 'logs'}", flush=True)
    exports = client_exports(data_dir, port_offset)
    if exports:
        print(f"  point the veil command at it: export {exports}", flush=True)
    # Say it where people look: a sim mesh is a development tool, not a confidential one.
    print(
        "  the enclave is SIMULATED: this machine holds its platform secret and the dev SGX root's "
        "keys, so nothing here is hidden from whoever runs it (deploy/k8s/overlays/aks runs on SGX)",
        flush=True,
    )
    mesh.watch()
    mesh.stop()
    _log.info("mesh stopped")
    return 0


def await_mesh_up(process: subprocess.Popen[str], port_offset: int = 0, timeout: float = 30.0) -> None:
    """Block until a `veil up` started with stdout piped says the mesh is up and its gateway
    reports SERVING; RuntimeError when it exits before."""
    assert process.stdout is not None
    said: list[str] = []
    for line in process.stdout:
        if line.startswith(MESH_UP):
            break
        said.append(line)
    else:
        # Its last lines name the service that failed and its log (a port in use, say).
        last = "".join(said[-5:])
        raise RuntimeError(f"veil up exited with {process.wait()} before the mesh came up:\n{last}")
    admin = f"127.0.0.1:{DEFAULT_PORTS['gateway'][1] + port_offset}"
    wait_until_serving(admin, label="gateway", timeout=timeout)
