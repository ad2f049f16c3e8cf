"""`veil bench`: confidential transactions per second against the transport baseline, in one run.

Against a running mesh, with the admin certificate:

1. set-up: the token instance `bench-<ack>` (signature auth), created by the first run and
   reused by every later one, so runs leave no instances behind (the mesh has no way to delete
   one); its issuer key is the `bench-issuer` identity in the data dir. One fresh account per
   client, funded by the issuer through the SDK;
2. warm-up: every client runs closed-loop token transfers the way the SDK does (seal, send,
   open and verify the answer) for `--warmup` seconds; its rate sizes the pool of step 3;
3. pre-sealing (default): each client seals a pool of transfers *before* the timed window.
   Each client owns its account, so its commands can be sealed in counter order in advance.
   The client-side cryptography (HPKE seal, Ed25519 sign; later response open and receipt
   verification) runs on the same 2 cores as the mesh; doing it outside the window makes the
   number describe the mesh, not this process. It is timed and reported (`client_seal_ms`,
   `client_open_ms`); `--seal-inline` keeps it inside the window instead;
4. confidential window (`--seconds`): `--clients` closed-loop clients send transfers
   (gateway -> state -> enclave -> durable commit); every answer is opened and its receipt
   verified after the window (a failure is an error, never ignored);
5. baseline window, same length and client count: `Ping` through the same gateway path
   (authentication plugin, rate limit, routing, deadline) to the state host, which answers
   without the enclave or storage, carrying a payload as large as a sealed transfer;
6. relay window, same length and client count: the same payload through a bare two-hop relay
   (veil.dev.relay: client -> proxy -> backend, each its own process, grpc.aio, raw bytes, no
   TLS, no interceptors), started for the run and stopped after it.

`ratio` = confidential / baseline throughput, `ratio_to_relay` = confidential / relay
throughput; a ratio is null when either of its windows had an error (a window cut short by
errors measures the errors, not the path). ECALLs per command and commands per commit are
the state shards' counter deltas over the confidential window (gateway GetStatus). Clients
run as threads in `--processes` worker processes (spawned; gRPC releases the GIL during I/O).

The gateway rate-limits per principal (default 200/s); the local mesh `veil up` starts has dev
limits that fit a benchmark (veil.dev.supervisor.DEV_GATEWAY_RATE). Against a gateway with
production limits the run reports RESOURCE_EXHAUSTED errors and no ratio, and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.rpc import status_pb2

from veil.cli.common import client_files, open_client, positive, seconds
from veil.dev.loadclient import token_config_for
from veil.dev.relay import METHOD as RELAY_METHOD
from veil.dev.relay import running_relay
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.sdk.calls import MemoryCalls
from veil.sdk.client import MAX_MESSAGE_BYTES, VeilClient
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import VeilClientError
from veil.sdk.identity import SigningIdentity, identity_paths, load_identity, new_identity
from veil.sdk.sealing import SealedRequest, open_outcome, seal_command
from veil.status import StatusError

INITIAL_BALANCE = 10**12
BENCH_ISSUER = "bench-issuer"
_CALL_TIMEOUT_S = 30.0
_START_DELAY_S = 0.3  # lets every worker thread reach the start line before the window opens
_POOL_HEADROOM = 3.0  # pre-sealed commands per client: 3x the warm-up rate (pre-sealed is faster)
_POOL_MINIMUM = 32


# --- what a worker process needs ------------------------------------------------------------


@dataclass(frozen=True)
class GatewayTarget:
    """How to reach the gateway (picklable: passed to worker processes)."""

    target: str
    ca: bytes | None
    cert: bytes | None
    key: bytes | None
    server_name: str | None = None

    def channel(self) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),  # a benchmark counts failures, it does not hide them
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(self.target, credentials, options=options)


@dataclass(frozen=True)
class ClientSpec:
    """One closed-loop client: its account's private key and who it pays."""

    index: int
    private_key: bytes
    to: str


@dataclass(frozen=True)
class WorkerSpec:
    """A worker process's share of the clients and the instance they use."""

    target: GatewayTarget
    instance_id: str
    scheme: int
    keys: bytes  # serialized EnclavePublicKeys of the attested enclave
    payload_size: int
    clients: tuple[ClientSpec, ...]
    batch: int = 1  # commands per call: 1 is Execute, more is one ExecuteBatch


@dataclass
class RunResult:
    """What one window produced (per worker, then merged)."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sealed_in_window: int = 0

    def merge(self, other: RunResult) -> None:
        self.latencies += other.latencies
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count
        self.sealed_in_window += other.sealed_in_window


@dataclass
class CryptoResult:
    """Client-side cryptography done outside a window: how many, how long, how many failed."""

    count: int = 0
    seconds: float = 0.0
    failures: int = 0

    def merge(self, other: CryptoResult) -> None:
        self.count += other.count
        self.seconds += other.seconds
        self.failures += other.failures


def _transfer(to: str) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=to, amount=1)))


class _CallFailed(Exception):
    """A call (or one command of a batch) failed with this status name."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _Client:
    """One account's closed loop; its commands carry consecutive counters."""

    def __init__(self, spec: ClientSpec, worker: WorkerSpec, keys: envelope_pb2.EnclavePublicKeys) -> None:
        self.spec = spec
        self.identity = SigningIdentity(ed25519.Ed25519PrivateKey.from_private_bytes(spec.private_key))
        self.instance_id = worker.instance_id
        self.scheme = worker.scheme
        self.keys = keys
        self.call = _transfer(spec.to)
        self.batch = worker.batch
        self.counter = 0  # the last counter sealed
        self.pool: collections.deque[SealedRequest] = collections.deque()
        self.answered: list[tuple[SealedRequest, envelope_pb2.CommandOutcome]] = []
        self.broken = False  # a failed command leaves its counter's fate unknown: stop this client

    def seal_next(self) -> SealedRequest:
        self.counter += 1
        return seal_command(
            self.keys,
            instance_id=self.instance_id,
            scheme=self.scheme,  # type: ignore[arg-type]  # an AuthScheme value, pickled as int
            identity=self.identity,
            call=self.call,
            counter=self.counter,
            request_id=f"bench-{self.spec.index}-{self.counter}-{secrets.token_hex(6)}",
        )

    def verified(self, sealed: SealedRequest, outcome: envelope_pb2.CommandOutcome) -> bool:
        """Open the answer and check its receipt; True for an accepted, successful transfer."""
        try:
            opened = open_outcome(sealed, outcome, self.keys.signing_public_key, query=False)
        except Exception:
            return False
        return opened.accepted and not opened.result.HasField("error")

    def preseal(self, count: int) -> CryptoResult:
        for _ in range(count):
            self.pool.append(self.seal_next())
        return CryptoResult(count)

    def verify(self) -> CryptoResult:
        answered, self.answered = self.answered, []
        failures = sum(not self.verified(sealed, outcome) for sealed, outcome in answered)
        return CryptoResult(len(answered), failures=failures)

    def run_execute(
        self, stub: gateway_pb2_grpc.GatewayServiceStub, start: float, end: float, inline: bool
    ) -> RunResult:
        result = RunResult()
        _sleep_until(start)
        last_sent = self.counter - len(self.pool)
        while not self.broken and time.time() < end:
            began = time.perf_counter()
            sealed = [self._next(inline, result) for _ in range(self.batch)]
            try:
                outcomes = self._send(stub, sealed)
            except _CallFailed as failed:
                result.errors[failed.code] = result.errors.get(failed.code, 0) + 1
                self.broken = True
                break
            last_sent = sealed[-1].counter
            if inline:
                if not all(self.verified(s, o) for s, o in zip(sealed, outcomes, strict=True)):
                    result.errors["NOT_VERIFIED"] = result.errors.get("NOT_VERIFIED", 0) + 1
                    self.broken = True
                    break
            else:
                self.answered.extend(zip(sealed, outcomes, strict=True))
            if time.time() <= end:  # only answers inside the window count, one per command
                result.latencies.extend([time.perf_counter() - began] * len(sealed))
        # Unsent pre-sealed commands are dropped; the next command continues the counters.
        self.pool.clear()
        self.counter = last_sent
        return result

    def _next(self, inline: bool, result: RunResult) -> SealedRequest:
        if self.pool and not inline:
            return self.pool.popleft()
        result.sealed_in_window += not inline
        return self.seal_next()

    def _send(
        self, stub: gateway_pb2_grpc.GatewayServiceStub, sealed: list[SealedRequest]
    ) -> list[envelope_pb2.CommandOutcome]:
        """One Execute, or (`--batch`) one ExecuteBatch carrying them all; their outcomes in order."""
        requests = [
            gateway_pb2.ExecuteRequest(
                instance_id=self.instance_id, command=s.command, request_id=s.request_id
            )
            for s in sealed
        ]
        try:
            if len(requests) == 1:
                return [stub.Execute(requests[0], timeout=_CALL_TIMEOUT_S).outcome]
            outcomes: dict[int, envelope_pb2.CommandOutcome] = {}
            for item in stub.ExecuteBatch(
                gateway_pb2.ExecuteBatchRequest(commands=requests), timeout=_CALL_TIMEOUT_S
            ):
                if item.WhichOneof("result") != "response":
                    raise _CallFailed(StatusError(status_pb2.Status.FromString(item.status)).code().name)
                outcomes[item.index] = item.response.outcome
        except grpc.RpcError as error:
            raise _CallFailed(error.code().name) from None
        if len(outcomes) != len(requests):
            raise _CallFailed("MISSING_ANSWER")
        return [outcomes[i] for i in range(len(requests))]

    def run_ping(
        self, stub: gateway_pb2_grpc.GatewayServiceStub, start: float, end: float, payload: bytes
    ) -> RunResult:
        request = gateway_pb2.PingRequest(instance_id=self.instance_id, payload=payload)
        return _closed_loop(lambda: stub.Ping(request, timeout=_CALL_TIMEOUT_S), start, end)


def _closed_loop(call: Callable[[], object], start: float, end: float) -> RunResult:
    """Call `call` back to back from `start` to `end`; the first error stops this client."""
    result = RunResult()
    _sleep_until(start)
    while time.time() < end:
        began = time.perf_counter()
        try:
            call()
        except grpc.RpcError as error:
            result.errors[error.code().name] = result.errors.get(error.code().name, 0) + 1
            break
        if time.time() <= end:
            result.latencies.append(time.perf_counter() - began)
    return result


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def _in_threads(clients: Sequence[_Client], work: Callable[[_Client], Any]) -> list[Any]:
    results: list[Any] = [None] * len(clients)

    def one(index: int) -> None:
        results[index] = work(clients[index])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _relay(clients: Sequence[_Client], target: str, start: float, end: float, payload: bytes) -> RunResult:
    """The relay window: the same clients, plain channel, raw bytes."""
    run = RunResult()
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
        echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(RELAY_METHOD)
        for one in _in_threads(
            clients, lambda c: _closed_loop(lambda: echo(payload, timeout=_CALL_TIMEOUT_S), start, end)
        ):
            run.merge(one)
    return run


def _do(
    order: tuple[Any, ...],
    clients: Sequence[_Client],
    stub: gateway_pb2_grpc.GatewayServiceStub,
    payload: bytes,
) -> RunResult | CryptoResult:
    """Carry out one order from the parent over this worker's clients."""
    kind = order[0]
    if kind == "relay":
        _, target, start, end = order
        return _relay(clients, target, start, end, payload)
    if kind == "execute":
        _, start, end, inline = order
        run = RunResult()
        for one in _in_threads(clients, lambda c: c.run_execute(stub, start, end, inline)):
            run.merge(one)
        return run
    if kind == "ping":
        _, start, end = order
        run = RunResult()
        for one in _in_threads(clients, lambda c: c.run_ping(stub, start, end, payload)):
            run.merge(one)
        return run
    # CPU seconds of this process, not the threads' wall time (they share the GIL).
    cpu = time.process_time()
    crypto = CryptoResult()
    if kind == "preseal":
        for one in _in_threads(clients, lambda c: c.preseal(order[1])):
            crypto.merge(one)
        # The pools live through the windows: out of the collector, whose full collections
        # walked them (60 ms pauses inside the window at 64 clients, counted as mesh latency).
        gc.freeze()
    elif kind == "verify":
        for client in clients:
            crypto.merge(client.verify())
    else:
        raise ValueError(f"unknown order {kind!r}")
    crypto.seconds = time.process_time() - cpu
    return crypto


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """A worker process: its clients as threads, one phase per order from the parent."""
    keys = envelope_pb2.EnclavePublicKeys.FromString(spec.keys)
    clients = [_Client(c, spec, keys) for c in spec.clients]
    payload = secrets.token_bytes(spec.payload_size)
    with spec.target.channel() as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        conn.send("ready")
        while (order := conn.recv()) is not None:
            conn.send(_do(order, clients, stub, payload))


class Workers:
    """Worker processes holding the clients (round-robin), driven phase by phase."""

    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        self._pipes: list[Connection] = []
        self.processes: list[Any] = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child, spec), daemon=True)
            process.start()
            self._pipes.append(parent)
            self.processes.append(process)
        for pipe in self._pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("a bench worker did not start")

    def _all(self, order: tuple[Any, ...]) -> list[Any]:
        for pipe in self._pipes:
            pipe.send(order)
        return [pipe.recv() for pipe in self._pipes]

    def execute(self, seconds: float, *, inline: bool) -> tuple[RunResult, float, float]:
        start = time.time() + _START_DELAY_S
        merged = RunResult()
        for one in self._all(("execute", start, start + seconds, inline)):
            merged.merge(one)
        return merged, start, start + seconds

    def ping(self, seconds: float) -> RunResult:
        start = time.time() + _START_DELAY_S
        merged = RunResult()
        for one in self._all(("ping", start, start + seconds)):
            merged.merge(one)
        return merged

    def relay(self, target: str, seconds: float) -> RunResult:
        start = time.time() + _START_DELAY_S
        merged = RunResult()
        for one in self._all(("relay", target, start, start + seconds)):
            merged.merge(one)
        return merged

    def crypto(self, order: tuple[Any, ...]) -> CryptoResult:
        merged = CryptoResult()
        for one in self._all(order):
            merged.merge(one)
        return merged

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(30)


# --- measurements --------------------------------------------------------------------------


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of `samples`, 0 when empty."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class Counters:
    """The state shards' counters, summed (gateway GetStatus)."""

    ecalls: int
    commands: int
    commits: int

    @classmethod
    def read(cls, client: VeilClient) -> Counters:
        shards = client.status().shards
        return cls(
            sum(s.ecalls for s in shards), sum(s.commands for s in shards), sum(s.commits for s in shards)
        )


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a local process (Linux /proc), None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU use of named local processes over a window, in cores (CPU seconds per second)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        return {name: sum(_cpu_seconds(p) or 0.0 for p in pids) for name, pids in self.pids.items()}

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
        return {name: round((after[name] - before[name]) / seconds, 3) for name in before}

    def during(self, run: Callable[[], RunResult]) -> tuple[RunResult, dict[str, float], float | None]:
        """Run one window: its result, the cores each process kept busy, CPU ms per call."""
        before, started = self.sample(), time.time()
        result = run()
        after = self.sample()
        cores = self.cores(before, after, time.time() - started)
        return result, cores, self.ms_per_call(before, after, len(result.latencies))

    @staticmethod
    def ms_per_call(before: dict[str, float], after: dict[str, float], calls: int) -> float | None:
        """CPU milliseconds all the measured processes spent per call of a window: the budget a
        path costs, which bounds its throughput on this machine's cores whatever the latency."""
        spent = sum(after[name] - before[name] for name in before)
        return round(1000 * spent / calls, 3) if calls else None


def machine() -> dict[str, Any]:
    """What the numbers ran on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        memory_gib = round(kib / 2**20, 1)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """What `veil bench` was asked to do."""

    clients: int = 16
    seconds: float = 10.0
    warmup: float = 3.0
    processes: int = 2
    inline: bool = False
    cpu_pids: dict[str, list[int]] = field(default_factory=dict)
    ack: str = "strict"
    data_dir: Path | None = None  # keeps the bench issuer, so its instance is reused
    batch: int = 1  # transfers per call (ExecuteBatch when more than 1)


ACK_MODES = {"strict": envelope_pb2.ACKNOWLEDGMENT_STRICT, "fast": envelope_pb2.ACKNOWLEDGMENT_FAST}


def _token_config(issuer: SigningIdentity, ack: str) -> envelope_pb2.InstanceConfig:
    config = token_config_for(issuer.public_key)
    config.acknowledgment = ACK_MODES[ack]
    return config


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _issuer(data_dir: Path | None) -> SigningIdentity:
    """The bench instances' issuer: kept in the data dir, so every run reuses its instance."""
    if data_dir is None:
        return SigningIdentity(ed25519.Ed25519PrivateKey.generate(), BENCH_ISSUER)
    key_path, _ = identity_paths(data_dir, BENCH_ISSUER)
    if not key_path.exists():
        return new_identity(data_dir, BENCH_ISSUER)
    return load_identity(data_dir, BENCH_ISSUER)


def _bench_instance(client: VeilClient, issuer: SigningIdentity, ack: str) -> tuple[str, bool]:
    """(instance id, reused): `bench-<ack>` when it is this issuer's, else a new one (said so)."""
    config = _token_config(issuer, ack)
    instance_id = f"bench-{ack}"
    if any(i.instance_id == instance_id for i in client.list_instances()):
        descriptor = client.attest(instance_id, refresh=True).descriptor
        if descriptor is not None and descriptor.config == config:
            return instance_id, True
        instance_id = f"bench-{ack}-{secrets.token_hex(4)}"
        _log(f"bench-{ack} has another issuer (another data dir?); creating {instance_id}, which stays")
    client.create_instance(instance_id, config)
    return instance_id, False


def setup(
    client: VeilClient, clients: int, ack: str = "strict", data_dir: Path | None = None
) -> tuple[str, list[ClientSpec], envelope_pb2.EnclavePublicKeys]:
    """The bench instance and one fresh funded account per client (a ring: each pays the next)."""
    issuer = _issuer(data_dir)
    instance_id, reused = _bench_instance(client, issuer, ack)
    _log(f"{'reusing' if reused else 'created'} instance {instance_id}")
    accounts = [ed25519.Ed25519PrivateKey.generate() for _ in range(clients)]
    public = [key.public_key().public_bytes_raw().hex() for key in accounts]
    token = client.token(instance_id, issuer)
    token.balance()  # a reused instance: learn the issuer's counter before its first mint
    for account in public:
        token.mint(account, INITIAL_BALANCE)
    specs = [
        ClientSpec(i, key.private_bytes_raw(), public[(i + 1) % clients]) for i, key in enumerate(accounts)
    ]
    return instance_id, specs, client.attest(instance_id).keys


def _tps(result: RunResult, seconds: float) -> float:
    return len(result.latencies) / seconds


def run(client: VeilClient, connection: GatewayTarget, options: BenchOptions) -> dict[str, Any]:
    """Set up, warm up, measure confidential then baseline; one JSON-ready report."""
    _log(f"setting up {options.clients} accounts")
    instance_id, specs, keys = setup(client, options.clients, options.ack, options.data_dir)
    probe = seal_command(
        keys,
        instance_id=instance_id,
        scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        identity=SigningIdentity(ed25519.Ed25519PrivateKey.generate()),
        call=_transfer(specs[0].to),
        counter=1,
        request_id=f"bench-0-1-{secrets.token_hex(6)}",
    )
    payload_size = len(probe.command.SerializeToString())
    processes = max(1, min(options.processes, options.clients))
    workers = Workers(
        [
            WorkerSpec(
                connection,
                instance_id,
                envelope_pb2.AUTH_SCHEME_SIGNATURE,
                keys.SerializeToString(),
                payload_size,
                tuple(s for s in specs if s.index % processes == p),
                options.batch,
            )
            for p in range(processes)
        ]
    )
    try:
        with running_relay() as (relay_target, relay_pids):
            meter = CpuMeter(
                {
                    **options.cpu_pids,
                    "bench": [os.getpid(), *(p.pid for p in workers.processes if p.pid)],
                    "relay": relay_pids,
                }
            )
            report = _measure(
                client, workers, meter, options, instance_id=instance_id, relay_target=relay_target
            )
    finally:
        workers.close()
    report.update(
        {
            "clients": options.clients,
            "seconds": options.seconds,
            "warmup_seconds": options.warmup,
            "processes": processes,
            "batch": options.batch,
            "instance": instance_id,
            "payload_bytes": payload_size,
            "machine": machine(),
        }
    )
    return report


def _ratio(numerator: RunResult, denominator: RunResult) -> float | None:
    """numerator / denominator throughput (same window length), None when either window erred."""
    if numerator.errors or denominator.errors or not denominator.latencies:
        return None
    return round(len(numerator.latencies) / len(denominator.latencies), 3)


def _measure(
    client: VeilClient,
    workers: Workers,
    meter: CpuMeter,
    options: BenchOptions,
    *,
    instance_id: str,
    relay_target: str,
) -> dict[str, Any]:
    seconds = options.seconds
    _log(f"warm-up {options.warmup:.0f}s (SDK-style: seal, send, open and verify inline)")
    warm, _, _ = workers.execute(options.warmup, inline=True)
    if warm.errors:
        raise VeilClientError(f"the warm-up failed, nothing measured: {_errors(warm.errors)}")
    presealed = CryptoResult()
    if not options.inline:
        per_client = _tps(warm, options.warmup) / options.clients
        pool = int(per_client * seconds * _POOL_HEADROOM) + _POOL_MINIMUM
        _log(f"pre-sealing {pool} commands per client")
        presealed = workers.crypto(("preseal", pool))

    _log(f"confidential window {seconds:.0f}s, {options.clients} clients")
    before, cpu_before = Counters.read(client), meter.sample()
    confidential, start, _ = workers.execute(seconds, inline=options.inline)
    cpu_after = meter.sample()
    after = Counters.read(client)
    cpu_confidential = CpuMeter.cores(cpu_before, cpu_after, time.time() - start)
    cpu_ms = {"confidential": CpuMeter.ms_per_call(cpu_before, cpu_after, len(confidential.latencies))}
    verified = workers.crypto(("verify",))

    _log(f"baseline window {seconds:.0f}s (Ping), {options.clients} clients")
    workers.ping(min(options.warmup, 2.0))  # warm the Ping path too
    baseline, cpu_baseline, cpu_ms["baseline"] = meter.during(lambda: workers.ping(seconds))

    _log(f"relay window {seconds:.0f}s (bare two-hop gRPC relay), {options.clients} clients")
    workers.relay(relay_target, min(options.warmup, 2.0))
    relay, cpu_relay, cpu_ms["relay"] = meter.during(lambda: workers.relay(relay_target, seconds))

    # The first GetStatus costs one ECALL (the enclave's memory figures); the second's own
    # ECALL is counted after its reply is built.
    ecalls = after.ecalls - before.ecalls - 1
    commands = after.commands - before.commands
    commits = after.commits - before.commits
    confidential_tps = _tps(confidential, seconds)
    baseline_tps = _tps(baseline, seconds)
    errors = dict(confidential.errors)
    for code, count in baseline.errors.items():
        errors[f"baseline:{code}"] = count
    for code, count in relay.errors.items():
        errors[f"relay:{code}"] = count
    if verified.failures:
        errors["NOT_VERIFIED"] = verified.failures
    return {
        "confidential_tps": round(confidential_tps, 1),
        "baseline_tps": round(baseline_tps, 1),
        "relay_tps": round(_tps(relay, seconds), 1),
        # A failed verification makes the confidential window erroneous too.
        "ratio": None if verified.failures else _ratio(confidential, baseline),
        "ratio_to_relay": None if verified.failures else _ratio(confidential, relay),
        "p50_ms": round(1000 * percentile(confidential.latencies, 0.50), 2),
        "p99_ms": round(1000 * percentile(confidential.latencies, 0.99), 2),
        "baseline_p50_ms": round(1000 * percentile(baseline.latencies, 0.50), 2),
        "baseline_p99_ms": round(1000 * percentile(baseline.latencies, 0.99), 2),
        "relay_p50_ms": round(1000 * percentile(relay.latencies, 0.50), 2),
        "relay_p99_ms": round(1000 * percentile(relay.latencies, 0.99), 2),
        "relay_calls": len(relay.latencies),
        "ecalls_per_command": round(ecalls / commands, 4) if commands else None,
        "commands_per_commit": round(commands / commits, 2) if commits else None,
        "commands": len(confidential.latencies),
        "baseline_calls": len(baseline.latencies),
        "presealed": not options.inline,
        "acknowledgment": options.ack,
        "sealed_in_window": confidential.sealed_in_window,
        "client_seal_ms": round(1000 * presealed.seconds / presealed.count, 3) if presealed.count else None,
        "client_open_ms": round(1000 * verified.seconds / verified.count, 3) if verified.count else None,
        # Inline, every answer was verified inside the window (a failure stops its client).
        "verified": len(confidential.latencies) if options.inline else verified.count - verified.failures,
        "errors": errors,
        "cpu_cores": {"confidential": cpu_confidential, "baseline": cpu_baseline, "relay": cpu_relay},
        # Per command (confidential) or call: complete only when every mesh process is named
        # with --cpu-pid (make bench names them); the bench client and the relay always count.
        "cpu_ms_per_call": cpu_ms,
        "cpu_measured": sorted(meter.pids),
        "instance_id": instance_id,
    }


def _errors(errors: dict[str, int]) -> str:
    text = ", ".join(f"{code} x{count}" for code, count in sorted(errors.items()))
    if any("RESOURCE_EXHAUSTED" in code for code in errors):
        text += (
            " (the gateway's rate limit: bench the mesh `veil up` starts, or one started with"
            " VEIL_GATEWAY_RATE/VEIL_GATEWAY_BURST raised)"
        )
    return text


# --- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`veil bench` options (the connection options come from veil.cli.common)."""
    parser.add_argument("--clients", type=positive(4096), default=16, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=seconds, default=10.0, help="length of each timed window")
    parser.add_argument("--warmup", type=seconds, default=3.0, help="warm-up seconds before the windows")
    parser.add_argument(
        "--processes", type=positive(256), default=2, help="worker processes the client threads run in"
    )
    parser.add_argument(
        "--ack",
        choices=sorted(ACK_MODES),
        default="strict",
        help="acknowledgment of the bench instance: strict (the default: answers wait for the "
        "keyvault's head) or fast (answers once durable)",
    )
    parser.add_argument(
        "--batch",
        type=positive(256),
        default=1,
        help="transfers per call: 1 (the default) sends each as its own Execute; N sends a "
        "client's next N (consecutive counters) as one ExecuteBatch",
    )
    parser.add_argument(
        "--seal-inline",
        action="store_true",
        help="seal and verify inside the timed window (SDK-like client cost) instead of pre-sealing",
    )
    parser.add_argument(
        "--cpu-pid",
        action="append",
        type=cpu_pid,
        default=[],
        metavar="NAME=PID[,PID]",
        help="report the CPU use of these local processes per window (repeatable); CPU per call "
        "covers the whole path only when every mesh process is named (make bench names them)",
    )


def cpu_pid(text: str) -> tuple[str, list[int]]:
    """NAME=PID[,PID]: local processes whose CPU the bench reports, each one readable now (a
    wrong pid would count as an idle process)."""
    name, _, numbers = text.partition("=")
    if not name or not all(n.isdigit() for n in numbers.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PID[,PID]")
    pids = [int(n) for n in numbers.split(",")]
    for pid in pids:
        if _cpu_seconds(pid) is None:
            raise argparse.ArgumentTypeError(f"{text!r}: no local process {pid} whose CPU can be read")
    return name, pids


def bench_command(args: argparse.Namespace) -> int:
    """`veil bench`: prints a summary, or with --json one JSON object on stdout."""
    cpu_pids = dict(args.cpu_pid)
    client = open_client(args)
    client.counters = MemoryCounters()  # ephemeral accounts: keep them out of counters.json
    client.calls = MemoryCalls()  # and their calls out of calls/
    data_dir = Path(args.data_dir)
    ca, cert, key = client_files(args)
    connection = GatewayTarget(
        args.gateway,
        ca.read_bytes() if ca.exists() else None,
        cert.read_bytes() if cert else None,
        key.read_bytes() if key else None,
    )
    options = BenchOptions(
        clients=args.clients,
        seconds=args.seconds,
        warmup=args.warmup,
        processes=args.processes,
        inline=args.seal_inline,
        cpu_pids=cpu_pids,
        ack=args.ack,
        data_dir=data_dir,
        batch=args.batch,
    )
    with client:
        report = run(client, connection, options)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_summary(report)
    if report["errors"]:
        _log(f"errors: {_errors(report['errors'])}")
        return 1
    return 0


def _print_summary(report: dict[str, Any]) -> None:
    sealing = (
        "pre-sealed before the window" if report["presealed"] else "sealed and verified inside the window"
    )
    lines = [
        f"clients {report['clients']}, {report['seconds']:.0f}s per window, commands {sealing}",
        f"confidential  {report['confidential_tps']:>9.1f} tx/s   p50 {report['p50_ms']:.2f} ms   "
        f"p99 {report['p99_ms']:.2f} ms",
        f"baseline      {report['baseline_tps']:>9.1f} /s     p50 {report['baseline_p50_ms']:.2f} ms   "
        f"p99 {report['baseline_p99_ms']:.2f} ms",
        f"relay         {report['relay_tps']:>9.1f} /s     p50 {report['relay_p50_ms']:.2f} ms   "
        f"p99 {report['relay_p99_ms']:.2f} ms",
        f"ratio         {_shown(report['ratio'])} to the baseline, {_shown(report['ratio_to_relay'])} "
        "to the relay",
        f"ECALLs/command {report['ecalls_per_command']}   commands/commit {report['commands_per_commit']}",
        f"client crypto: seal {report['client_seal_ms']} ms, open+verify {report['client_open_ms']} ms "
        "per command",
        cpu_line(report),
    ]
    print("\n".join(lines))


#: What the bench measures without --cpu-pid: its own processes and the relay's.
_ALWAYS_MEASURED = {"bench", "relay"}
_MESH_UNMEASURED = (
    " (the mesh's processes are not counted: name them with --cpu-pid NAME=PID for the whole path)"
)


def cpu_line(report: dict[str, Any]) -> str:
    """CPU per call of each window, naming what was measured (and what was not)."""
    measured = report["cpu_measured"]
    windows = ", ".join(f"{window} {_ms(ms)}" for window, ms in report["cpu_ms_per_call"].items())
    missing = "" if set(measured) - _ALWAYS_MEASURED else _MESH_UNMEASURED
    return f"CPU per call over {', '.join(measured)}: {windows}{missing}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _shown(ratio: float | None) -> str:
    return "n/a (a window had errors)" if ratio is None else f"{ratio:.3f}"
