"""State-service benchmark (by hand or `make bench-state`; not a timed test). Prints one JSON object.

Everything is real and local: a dev PKI, the keyvault and the state server in this process
over mTLS gRPC, the enclave runner as its own process (pipe), SQLite under a temp dir (or, with
`--db URL`, PostgreSQL in a schema of the run's own, dropped after it).
Clients act as the gateway identity and send signed token transfers.

1. Batching: for 1, 16 and 64 concurrent clients (closed loop), commands/s, latency, ECALLs per
   command and commands per commit (from GetStatus counters).
2. History: the 64-client load continues until the log holds `--entries` entries (no snapshots).
3. Recovery, snapshots off: a new host over that database replays every entry;
   replay rate = entries / the time from the first database read to the instance restored
   (the keyvault's head, the reads, and Restore in parts); also the whole start-up time.
4. Recovery, snapshots on (every 1000): the same database with a snapshot at its head and then
   999 more entries (the worst case a host that snapshots every 1000 entries replays).
5. Memory (`veil.dev.state_memory`): a token instance with 10k, 100k and 1M accounts restored
   from a snapshot by a fresh enclave runner: the bytes the enclave accounts against its
   memory budget (GetStatus) and the runner's resident memory (VmRSS), per account.

    python -m veil.dev.state_bench [--entries 100000] [--seconds 5] [--clients 1,16,64] [--db URL]
        [--accounts 10000,100000,1000000] [--memory-mb 96] [--memory-only]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.dev.loadclient import Account, mint, token_config, transfer
from veil.dev.pki import init_pki
from veil.dev.policies import write_dev_enclave_policy
from veil.dev.state_memory import DEFAULT_LEVELS
from veil.dev.state_memory import measure as measure_memory
from veil.services.common.channels import secure_channel
from veil.services.common.config import (
    ENV_STATE_DB,
    ENV_STATE_DB_SCHEMA,
    ENV_STATE_ENCLAVE_MODE,
    ENV_STATE_KEYVAULT_ADDR,
    ENV_STATE_SNAPSHOT_EVERY,
    ServiceConfig,
    TlsFiles,
)
from veil.services.keyvault.config import KekConfig, KeyvaultConfig
from veil.services.keyvault.server import create_server as create_keyvault
from veil.services.state import lifecycle
from veil.services.state.config import DEFAULT_MEMORY_MB, StateConfig
from veil.services.state.host import StateHost
from veil.services.state.keyvault_client import KeyvaultClient
from veil.services.state.runner import spawn_enclave
from veil.services.state.server import create_server
from veil.services.state.store import open_store
from veil.services.state.store_postgres import PostgresStore
from veil.state.v1 import state_pb2, state_pb2_grpc

INSTANCE = "bench"
INITIAL = 10**12


def _tls(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(cert=pki / f"{name}.pem", key=pki / f"{name}-key.pem", ca=pki / "ca.pem")


def _service(name: str, pki: Path, data_dir: Path) -> ServiceConfig:
    return ServiceConfig(name, "127.0.0.1:0", "127.0.0.1:0", _tls(pki, name), data_dir, grace_seconds=5.0)


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def _client_loop(
    stub: state_pb2_grpc.StateServiceStub,
    account: Account,
    *,
    deadline: float,
    until_sequence: int,
    stop: threading.Event,
    latencies: list[float],
) -> None:
    """One closed-loop client: a transfer, wait for its acknowledgement, the next one."""
    while not stop.is_set() and time.time() < deadline:
        sealed = account.seal(transfer(account.account, 1))  # to itself: the state stays small
        started = time.perf_counter()
        response = stub.Execute(
            state_pb2.ExecuteRequest(
                instance_id=INSTANCE, command=sealed.command, request_id=sealed.request_id
            ),
            timeout=60,
        )
        latencies.append(time.perf_counter() - started)
        if response.outcome.sequence >= until_sequence:
            stop.set()


def _worker(conn: Connection, address: str, pki: Path, private_keys: list[tuple[int, bytes]]) -> None:
    """A client process: its accounts' closed loops, phase by phase, as the gateway identity."""
    channel = secure_channel(address, _tls(pki, "gateway"))
    stub = state_pb2_grpc.StateServiceStub(channel)
    keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=30).bundle.keys
    accounts = [
        (index, Account(keys, INSTANCE, signer=ed25519.Ed25519PrivateKey.from_private_bytes(raw)))
        for index, raw in private_keys
    ]
    while (order := conn.recv()) is not None:
        active, deadline, until_sequence = order
        latencies: list[float] = []
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=_client_loop,
                args=(stub, a),
                kwargs={
                    "deadline": deadline,
                    "until_sequence": until_sequence,
                    "stop": stop,
                    "latencies": latencies,
                },
            )
            for i, a in accounts
            if i < active
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        conn.send(latencies)
    channel.close()


class Clients:
    """Closed-loop clients in worker processes (so client-side sealing and gRPC do not share
    the server's interpreter), each account on its own thread."""

    def __init__(self, address: str, pki: Path, private_keys: list[bytes], processes: int) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process running gRPC
        self._pipes: list[Connection] = []
        self._processes = []
        for p in range(processes):
            mine = [(i, raw) for i, raw in enumerate(private_keys) if i % processes == p]
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, address, pki, mine), daemon=True)
            process.start()
            self._pipes.append(parent)
            self._processes.append(process)

    def run(self, active: int, *, seconds: float = 1e9, until_sequence: int = 2**63) -> list[float]:
        """`active` clients until `seconds` pass or a command lands at `until_sequence`; latencies."""
        order = (active, time.time() + seconds, until_sequence)
        for pipe in self._pipes:
            pipe.send(order)
        latencies: list[float] = []
        for pipe in self._pipes:
            latencies += pipe.recv()
        return latencies

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.send(None)
        for process in self._processes:
            process.join(30)


def _batching(
    clients: Clients, status: Callable[[], state_pb2.GetStatusResponse], levels: Sequence[int], seconds: float
) -> list[dict[str, Any]]:
    results = []
    for level in levels:
        before = status()
        started = time.monotonic()
        latencies = clients.run(level, seconds=seconds)
        elapsed = time.monotonic() - started
        after = status()
        commands = after.commands - before.commands
        ecalls = after.ecalls - before.ecalls - 1  # the GetStatus ECALL of `after` itself
        commits = after.commits - before.commits
        results.append(
            {
                "clients": level,
                "commands": commands,
                "commands_per_second": round(commands / elapsed, 1),
                # None where nothing was done to divide by (a window too short to finish a command)
                "ecalls_per_command": round(ecalls / commands, 4) if commands else None,
                "commands_per_commit": round(commands / commits, 2) if commits else None,
                "p50_ms": round(1000 * _percentile(latencies, 0.5), 2),
                "p99_ms": round(1000 * _percentile(latencies, 0.99), 2),
            }
        )
        print(f"# {results[-1]}", file=sys.stderr)
    return results


def _recover(config: StateConfig, keyvault: KeyvaultClient) -> dict[str, Any]:
    """Start a host over the database and time it to SERVING; stops it again."""
    store = open_store(config.database, schema=config.database_schema)
    host = StateHost(config, store=store, keyvault=keyvault, enclave_factory=lambda: spawn_enclave(config))
    started = time.monotonic()
    host.start()
    step = host.wait_until({lifecycle.SERVING, lifecycle.FAILED}, 600)
    elapsed = time.monotonic() - started
    if step != lifecycle.SERVING:
        raise RuntimeError(f"recovery did not serve: {host.lifecycle.current()}")
    metrics = host.metrics.snapshot()
    host.stop()
    store.close()
    replayed, seconds = metrics["recovered_entries"], metrics["recovery_seconds"]
    return {
        "start_up_seconds": round(elapsed, 3),
        "replayed_entries": replayed,
        "verify_and_replay_seconds": round(seconds, 3),
        "replay_entries_per_second": round(replayed / seconds) if seconds else None,
    }


def _snapshot_then_tail(config: StateConfig, keyvault: KeyvaultClient, account: Account) -> int:
    """Snapshot the database at its head, then add `snapshot_every - 1` entries after it (the most
    a host that snapshots every N entries ever replays on top of its snapshot)."""
    store = open_store(config.database, schema=config.database_schema)
    host = StateHost(config, store=store, keyvault=keyvault, enclave_factory=lambda: spawn_enclave(config))
    host.start()
    host.wait_until({lifecycle.SERVING}, 600)
    account.keys = host.attestation_bundle().keys

    def one() -> int:
        sealed = account.seal(transfer(account.account, 1))
        return host.execute(INSTANCE, sealed.command, sealed.request_id, 60).outcome.sequence

    first = one()
    deadline = time.monotonic() + 30
    while host.metrics.snapshots == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the snapshot is taken right after the acknowledgement
    for _ in range(config.snapshot_every - 1):
        one()
    host.stop()
    loaded = store.load(INSTANCE)
    store.close()
    if loaded.snapshot is None or loaded.snapshot.sequence != first:
        raise RuntimeError("no snapshot was taken at the head")
    return len(loaded.entries)


def _memory(workdir: Path, accounts: Sequence[int], memory_mb: int) -> dict[str, Any]:
    pki = workdir / "pki"
    if not (pki / "ca.pem").exists():
        init_pki(pki, now=dt.datetime.now(dt.UTC))
    return measure_memory(
        accounts, pki_dir=pki, platform_secret=workdir / "memory-platform-secret", memory_mb=memory_mb
    )


def run(
    entries: int,
    seconds: float,
    levels: Sequence[int],
    workdir: Path,
    processes: int,
    *,
    database: str | None = None,
) -> dict[str, Any]:
    pki = workdir / "pki"
    init_pki(pki, now=dt.datetime.now(dt.UTC))
    kv_dir = workdir / "keyvault"
    kv_dir.mkdir()
    kv_server, kv_port = create_keyvault(
        _service("keyvault", pki, kv_dir),
        keyvault_config=KeyvaultConfig(
            db=str(kv_dir / "keyvault.db"),
            kek=KekConfig(provider="file", file=kv_dir / "kek.bin"),
            attestation_root="dev",
            dev_root_path=pki / "sgx-root.pem",
            enclave_policy_file=write_dev_enclave_policy(kv_dir),  # the sim enclave of this checkout
        ),
    )
    kv_server.start()
    service = _service("state", pki, workdir)  # the data dir whose pki/ holds the sim PCK chain
    env = {
        ENV_STATE_ENCLAVE_MODE: "sim",
        ENV_STATE_KEYVAULT_ADDR: f"127.0.0.1:{kv_port}",
        ENV_STATE_SNAPSHOT_EVERY: "0",
    }
    if database:  # a PostgreSQL URL: the run's own schema, dropped after it
        env |= {ENV_STATE_DB: database, ENV_STATE_DB_SCHEMA: f"veil_bench_{secrets.token_hex(6)}"}
    config = StateConfig.from_env(service, env)
    server, port = create_server(service, state_config=config)
    server.start()
    channel = secure_channel(f"127.0.0.1:{port}", _tls(pki, "gateway"))
    stub = state_pb2_grpc.StateServiceStub(channel)
    while stub.GetStatus(state_pb2.GetStatusRequest(), timeout=10).step != lifecycle.SERVING:
        time.sleep(0.1)
    keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=10).bundle.keys
    issuer_key = ed25519.Ed25519PrivateKey.generate()
    stub.CreateInstance(
        state_pb2.CreateInstanceRequest(
            instance_id=INSTANCE, config=token_config(issuer_key), request_id="c"
        ),
        timeout=30,
    )
    issuer = Account(keys, INSTANCE, signer=issuer_key)
    private_keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(max(levels))]
    for key in private_keys:
        to = key.public_key().public_bytes_raw().hex()
        sealed = issuer.seal(mint(to, INITIAL))
        stub.Execute(
            state_pb2.ExecuteRequest(
                instance_id=INSTANCE, command=sealed.command, request_id=sealed.request_id
            ),
            timeout=30,
        )
    raw = [key.private_bytes_raw() for key in private_keys]
    clients = Clients(f"127.0.0.1:{port}", pki, raw, processes=min(processes, max(levels)))

    def status() -> state_pb2.GetStatusResponse:
        return stub.GetStatus(state_pb2.GetStatusRequest(), timeout=10)

    report: dict[str, Any] = {"batching": _batching(clients, status, levels, seconds)}
    started = time.monotonic()
    clients.run(max(levels), until_sequence=entries)
    [instance] = stub.ListInstances(state_pb2.ListInstancesRequest(), timeout=10).instances
    report["history"] = {
        "entries": instance.head.sequence,
        "fill_seconds": round(time.monotonic() - started, 1),
    }
    clients.close()
    channel.close()
    server.stop(5)

    keyvault = KeyvaultClient.connect(f"127.0.0.1:{kv_port}", config.service.tls)
    report["recovery_snapshots_off"] = _recover(config, keyvault)
    with_snapshots = replace(config, snapshot_every=1000)
    remaining = _snapshot_then_tail(with_snapshots, keyvault, issuer)
    report["recovery_snapshots_on"] = {
        **_recover(with_snapshots, keyvault),
        "entries_after_snapshot": remaining,
    }
    keyvault.close()
    kv_server.stop(1)
    if database:
        cleaner = PostgresStore(config.database, schema=config.database_schema)
        cleaner.drop_schema()
        cleaner.close()
    report["database"] = "postgresql" if database else "sqlite"
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m veil.dev.state_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--entries", type=int, default=100_000, help="log size for the recovery runs")
    parser.add_argument(
        "--db", metavar="URL", help="a PostgreSQL URL for the state store (default: SQLite under a temp dir)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each batching level")
    parser.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated")
    parser.add_argument("--processes", type=int, default=4, help="client processes the clients run in")
    parser.add_argument(
        "--accounts",
        default=",".join(str(n) for n in DEFAULT_LEVELS),
        help="token accounts of the memory runs, comma-separated (empty: no memory runs)",
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=DEFAULT_MEMORY_MB,
        help="the enclave memory budget of the memory runs (default: the state host's)",
    )
    parser.add_argument("--memory-only", action="store_true", help="only the memory runs")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.clients.split(",")]
    accounts = [int(n) for n in args.accounts.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="veil-bench-state-") as workdir:
        report = (
            {}
            if args.memory_only
            else run(args.entries, args.seconds, levels, Path(workdir), args.processes, database=args.db)
        )
        if accounts:
            report["memory"] = _memory(Path(workdir), accounts, args.memory_mb)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except grpc.RpcError as exc:  # pragma: no cover - a broken run says why
        print(f"bench failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        raise SystemExit(1) from None
