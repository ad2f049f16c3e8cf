"""kill -9 the state service under concurrent load, again and again: nothing acknowledged is lost.

Real processes: `python -m veil.services.keyvault` and `python -m veil.services.state` (which
spawns the enclave runner), on free ports, in a temporary data dir. Client threads act as the
gateway identity; each owns one token account and transfers to the others, retrying a command
with its request id until it learns its fate:

* acknowledged (first answer, or the recorded answer of a retried request id), or
* refused as unopenable by a *restarted* enclave: the command was sealed to the old enclave's
  key, so it was never committed (a committed one would have been answered from the database);
  the client seals it again, with the same counter, to the new enclave.

Meanwhile anonymous voters vote once each on a ballot in a second instance (so batches and
commits mix instances). After the last restart every account's balance must equal what its
acknowledged transfers imply, the total supply is conserved, the log holds exactly the
acknowledged commands, and the closed ballot counts exactly the acknowledged votes: every
acknowledged command is present and nothing unacknowledged is half-applied.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import REPO_ROOT, tls_for
from tests.state.conftest import POSTGRES_URL
from tests.state.support import free_port
from tests.workers import Workers
from veil.dev.loadclient import (
    Account,
    balance,
    ballot_close,
    ballot_config,
    ballot_create,
    ballot_vote,
    mint,
    token_config,
    total_supply,
    transfer,
)
from veil.dev.pki import init_pki
from veil.dev.policies import write_dev_enclave_policy
from veil.enclave import wire
from veil.enclave.v1 import apps_pb2, command_pb2
from veil.gateway.v1 import gateway_pb2
from veil.services.common import config
from veil.services.common.channels import secure_channel, wait_until_serving
from veil.services.state.store_postgres import PostgresStore
from veil.state.v1 import state_pb2, state_pb2_grpc

pytestmark = pytest.mark.e2e

ACCOUNTS = 8
INITIAL = 1_000
KILLS = 3
LOAD_SECONDS = 1.5
BALLOT = "q1"
OPTIONS = ("yes", "no", "abstain")
VOTERS = 600
VOTER_THREADS = 4
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Service:
    """One `python -m veil.services.NAME` process and its ports."""

    name: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **self.env,
            **config.server_env(
                self.name, {config.LISTEN: self.address, config.ADMIN_LISTEN: f"127.0.0.1:{self.admin_port}"}
            ),
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"veil.services.{self.name}"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )

    def wait_serving(self, timeout: float = 30) -> None:
        assert self.process is not None
        wait_until_serving(
            f"127.0.0.1:{self.admin_port}",
            label=self.name,
            timeout=timeout,
            gave_up=lambda: None if self.process is None or self.process.poll() is None else "it exited",
        )

    def children(self) -> list[int]:
        """Child pids (the enclave runner) from /proc."""
        assert self.process is not None
        found: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                found += [int(pid) for pid in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue  # a thread that ended since the listing (seen in CI): it has no children
        return found

    def kill9(self) -> None:
        """SIGKILL the service process (no drain, no clean shutdown); its runner dies of EOF."""
        assert self.process is not None
        runners = self.children()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        for pid in runners:
            _wait_gone(pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}/status").exists() else ""
        if "State:\tZ" in status:
            return  # exited; its parent is gone, so init reaps it
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # our own runner, by its pid: never left behind
            return
        time.sleep(0.05)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Service, Service]]:
    data_dir = tmp_path / "data"
    init_pki(data_dir / "pki")
    env = {
        **os.environ,
        **config.server_env("keyvault", {config.DATA_DIR: str(data_dir), config.GRACE_SECONDS: "2"}),
        **config.server_env("state", {config.DATA_DIR: str(data_dir), config.GRACE_SECONDS: "2"}),
        config.ENV_KEYVAULT_ATTESTATION_ROOT: "dev",
        config.ENV_STATE_ENCLAVE_MODE: "sim",
        "PYTHONUNBUFFERED": "1",
    }
    schema = f"veil_state_e2e_{uuid.uuid4().hex[:12]}"
    if request.param == "postgres":
        env |= {"VEIL_STATE_DB": POSTGRES_URL, "VEIL_STATE_DB_SCHEMA": schema}
    # The operator enclave policy `veil up` writes: the sim enclave of this checkout.
    keyvault_env = {**env, config.ENV_KEYVAULT_ENCLAVE_POLICY_FILE: str(write_dev_enclave_policy(data_dir))}
    keyvault = Service("keyvault", keyvault_env, tmp_path / "keyvault.log")
    keyvault.start()
    state = Service("state", env, tmp_path / "state.log")
    state.env = {**env, config.ENV_STATE_KEYVAULT_ADDR: keyvault.address}
    try:
        keyvault.wait_serving()
        state.start()
        state.wait_serving(60)
        yield keyvault, state
    finally:
        state.stop()
        keyvault.stop()
        if request.param == "postgres":
            cleaner = PostgresStore(POSTGRES_URL, schema=schema)
            cleaner.drop_schema()
            cleaner.close()


@dataclass
class Holder:
    """One account and the fate of every command it sent."""

    account: Account
    sent: dict[str, int] = field(default_factory=dict)  # receiver -> acknowledged amount moved
    acknowledged: int = 0
    resealed: int = 0
    recovered: int = 0  # ran before a crash; the answer came from the enclave's counter record


class Load(Workers):
    """Client threads transferring tokens until told to stop."""

    def __init__(self, state: Service, pki: Path, holders: list[Holder], voters: list[Holder]) -> None:
        super().__init__(join_timeout=60)
        self._channel = secure_channel(state.address, tls_for(pki, "gateway"))
        self._stub = state_pb2_grpc.StateServiceStub(self._channel)
        self._holders = holders
        self._errors: list[BaseException] = []
        for holder in holders:
            self.spawn(self._run, holder)
        for i in range(VOTER_THREADS):
            self.spawn(self._vote, voters[i::VOTER_THREADS])
        self.votes = [0] * len(OPTIONS)
        self._lock = threading.Lock()

    def keys(self) -> gateway_pb2.GetAttestationResponse:
        while True:
            try:
                return self._stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle
            except grpc.RpcError as exc:
                if exc.code() not in _RETRY:
                    raise
                time.sleep(0.1)

    def execute(self, holder: Holder, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        """Run `call` to a known fate (acknowledged), resealing after an enclave restart."""
        account = holder.account
        sealed = account.seal(call)
        counter = account.counter
        hashes = {wire.command_hash(sealed.command.encapsulated_key, sealed.command.ciphertext)}
        while True:
            request = state_pb2.ExecuteRequest(
                instance_id=account.instance_id, command=sealed.command, request_id=sealed.request_id
            )
            try:
                response = self._stub.Execute(request, timeout=5)
            except grpc.RpcError as exc:
                if exc.code() in _RETRY:
                    time.sleep(0.05)
                    continue
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                # Unopenable: sealed to an enclave that no longer exists. It may still have run
                # before the crash (its answer then held and lost), so: same counter, new enclave.
                account.keys = self.keys().keys
                holder.resealed += 1
                sealed = account.seal(call, counter=counter)
                hashes.add(wire.command_hash(sealed.command.encapsulated_key, sealed.command.ciphertext))
                continue
            result = account.open(sealed, response.outcome)
            if response.outcome.accepted:
                return result
            state = result.counter
            # The counter was used by one of this call's own sealings: it ran; the enclave kept
            # its answer with the counter. Anything else is a failure of the test.
            assert state.next_counter == counter + 1, result
            assert state.last_command_hash in hashes, result
            holder.recovered += 1
            return command_pb2.CommandResult.FromString(state.last_result)

    def _run(self, holder: Holder) -> None:
        rng = random.Random(holder.account.account)
        others = [h.account.account for h in self._holders if h is not holder]
        try:
            while not self._stop.is_set():
                to, amount = rng.choice(others), rng.randint(1, 40)
                result = self.execute(holder, transfer(to, amount))
                holder.acknowledged += 1
                if not result.HasField("error"):  # an overdraft is refused (and acknowledged)
                    holder.sent[to] = holder.sent.get(to, 0) + amount
        except BaseException as exc:
            self._errors.append(exc)

    def _vote(self, voters: list[Holder]) -> None:
        try:
            for voter in voters:
                if self._stop.is_set():
                    return
                option = len(voter.account.name) % len(OPTIONS)
                call = ballot_vote(BALLOT, option, salt=secrets.token_bytes(16))
                result = self.execute(voter, call)
                assert not result.HasField("error"), result.error
                with self._lock:
                    self.votes[option] += 1
                time.sleep(0.01)
        except BaseException as exc:
            self._errors.append(exc)

    def stop(self) -> None:
        super().stop()
        self._channel.close()
        if self._errors:
            raise self._errors[0]


def _read(stub: state_pb2_grpc.StateServiceStub, account: Account, call: apps_pb2.AppCall) -> int:
    account.keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle.keys
    sealed = account.seal(call, counter=0)
    answer = stub.Query(
        state_pb2.QueryRequest(instance_id=account.instance_id, command=sealed.command), timeout=5
    )
    token = account.open(sealed, answer.outcome).result.token
    return int(getattr(token, str(token.WhichOneof("method"))).amount)


def test_kill_9_under_load_loses_no_acknowledged_transfer(
    mesh: tuple[Service, Service], tmp_path: Path
) -> None:
    _, state = mesh
    pki = tmp_path / "data" / "pki"
    issuer_key = ed25519.Ed25519PrivateKey.generate()
    with secure_channel(state.address, tls_for(pki, "gateway")) as channel:
        stub = state_pb2_grpc.StateServiceStub(channel)
        keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle.keys
        stub.CreateInstance(
            state_pb2.CreateInstanceRequest(
                instance_id="tokens", config=token_config(issuer_key), request_id="c"
            ),
            timeout=20,
        )
        stub.CreateInstance(
            state_pb2.CreateInstanceRequest(instance_id="ballots", config=ballot_config(), request_id="b"),
            timeout=20,
        )
    holders = [
        Holder(Account(keys, "tokens", signer=ed25519.Ed25519PrivateKey.generate())) for _ in range(ACCOUNTS)
    ]
    issuer = Holder(Account(keys, "tokens", signer=issuer_key))
    creator = Holder(Account(keys, "ballots", name="creator"))
    voters = [Holder(Account(keys, "ballots", name=f"voter-{i:0{i % 5 + 1}d}")) for i in range(VOTERS)]
    load = Load(state, pki, holders, voters)
    for holder in holders:
        load.execute(issuer, mint(holder.account.account, INITIAL))
    load.execute(creator, ballot_create(BALLOT, "Ship it?", OPTIONS))

    load.start()
    for _ in range(KILLS):
        time.sleep(LOAD_SECONDS)
        state.kill9()
        state.start()
        state.wait_serving(60)
    time.sleep(LOAD_SECONDS)
    load.stop()

    acknowledged = sum(h.acknowledged for h in holders)
    votes = sum(load.votes)
    assert acknowledged > 50, "too little load to prove anything"
    assert votes > 20, "too few votes to prove anything"
    assert sum(h.resealed for h in (*holders, *voters)) >= 1  # in-flight commands did straddle a crash
    with secure_channel(state.address, tls_for(pki, "gateway")) as channel:
        stub = state_pb2_grpc.StateServiceStub(channel)
        for holder in holders:
            name = holder.account.account
            received = sum(h.sent.get(name, 0) for h in holders)
            expected = INITIAL - sum(holder.sent.values()) + received
            assert _read(stub, holder.account, balance()) == expected, name
        assert _read(stub, issuer.account, total_supply()) == INITIAL * ACCOUNTS
        # Each log holds its genesis entry and exactly the acknowledged commands, nothing else.
        heads = {
            i.instance_id: i.head.sequence
            for i in stub.ListInstances(state_pb2.ListInstancesRequest()).instances
        }
        assert heads == {"tokens": 1 + ACCOUNTS + acknowledged, "ballots": 1 + 1 + votes}
        creator.account.keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle.keys
        sealed = creator.account.seal(ballot_close(BALLOT))
        response = stub.Execute(
            state_pb2.ExecuteRequest(
                instance_id="ballots", command=sealed.command, request_id=sealed.request_id
            ),
            timeout=10,
        )
        tally = creator.account.open(sealed, response.outcome).result.ballot.close
        assert list(tally.counts) == load.votes
        assert tally.voters == votes
