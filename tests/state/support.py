"""Test support for the state host: a real in-process keyvault that can go away and come back,
a host factory over a persistent data dir, and a store wrapper that can hold commits."""

from __future__ import annotations

import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import tls_for
from veil.dev.loadclient import Account, token_config
from veil.dev.policies import write_dev_enclave_policy
from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.keyvault.config import KekConfig, KeyvaultConfig
from veil.services.keyvault.server import create_server as create_keyvault_server
from veil.services.state import lifecycle
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.errors import StoreError
from veil.services.state.heads import Backoff
from veil.services.state.host import StateHost
from veil.services.state.keyvault_client import KeyvaultClient, KeyvaultUnavailable
from veil.services.state.runner import in_process_enclave
from veil.services.state.store import (
    IdempotencyRecord,
    InstanceRecord,
    StateStore,
    StoredEntry,
    StoredHead,
    StoredSnapshot,
)
from veil.services.state.store_sqlite import SqliteStore
from veil.state.v1 import state_pb2, state_pb2_grpc

READY = {lifecycle.SERVING, lifecycle.FAILED}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Keyvault:
    """A real keyvault server, in-process, on a fixed port so it can be stopped and restarted."""

    def __init__(self, base: ServiceConfig, pki_dir: Path, directory: Path) -> None:
        self.port = free_port()
        self._service = replace(base, listen=f"127.0.0.1:{self.port}", admin_listen="127.0.0.1:0")
        self._config = KeyvaultConfig(
            db=str(directory / "keyvault.db"),
            kek=KekConfig(provider="file", file=directory / "kek.bin"),
            attestation_root="dev",
            dev_root_path=pki_dir / "sgx-root.pem",
            # What `veil up` configures: the sim enclave of this checkout is the trusted build.
            enclave_policy_file=write_dev_enclave_policy(directory),
        )
        self._server: VeilServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server, _ = create_keyvault_server(self._service, keyvault_config=self._config)
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)
            self._server = None


class CountingKeyvault(KeyvaultClient):
    """The real client, counting key releases (to see whether keys came from the sealed cache)."""

    releases = 0

    def release_key(self, token: str, name: str, version: int = 0) -> keyvault_pb2.ReleaseKeyResponse:
        self.releases += 1
        return super().release_key(token, name, version)


class GatedStore(SqliteStore):
    """The SQLite store whose commits can be held (a commit in progress) or fail (a disk error)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.commits = 0
        self.failures = 0  # how many of the next commits (or catalogue reads) fail

    def list_instances(self) -> list[InstanceRecord]:
        if self.failures:
            self.failures -= 1
            raise StoreError("PostgreSQL error: OperationalError: the database system is starting up")
        return super().list_instances()

    def append_batch(self, entries: Sequence[StoredEntry], responses: Sequence[IdempotencyRecord]) -> None:
        self.entered.set()
        self.gate.wait(10)
        if self.failures:
            self.failures -= 1
            raise StoreError("SQLite error: disk I/O error")
        super().append_batch(entries, responses)
        self.commits += 1


@dataclass
class Node:
    """A state node's persistent files (database, sealed cache, platform) and its hosts over time."""

    base: ServiceConfig
    pki_dir: Path
    directory: Path
    keyvault: Keyvault
    hosts: list[StateHost] = field(default_factory=list)
    stores: list[StateStore] = field(default_factory=list)
    clients: list[CountingKeyvault] = field(default_factory=list)

    @property
    def database(self) -> Path:
        return self.directory / "state.db"

    def config(self, platform: str = "a", **overrides: object) -> StateConfig:
        settings = StateConfig(
            service=self.base,
            keyvault_address=self.keyvault.address,
            database=str(self.database),
            database_schema="unused",
            enclave_mode="sim",
            enclave_memory_mb=96,
            seal_dir=self.directory / "sealed",
            platform_secret=self.directory / f"platform-{platform}.key",
            pck_dir=self.pki_dir,
            snapshot_every=1000,
            batch_max=256,
            batch_linger_ms=2.0,
        )
        return replace(settings, **overrides)  # type: ignore[arg-type]

    def host(
        self,
        platform: str = "a",
        *,
        store: StateStore | None = None,
        enclave_factory: Callable[[StateConfig], EnclaveHost] = in_process_enclave,
        **overrides: object,
    ) -> StateHost:
        """Start a host (not waiting for it); a restart is simply another call."""
        settings = self.config(platform, **overrides)
        if store is None:
            store = SqliteStore(self.database)
            self.stores.append(store)
        channel = secure_channel(self.keyvault.address, tls_for(self.pki_dir, "state"))
        client = CountingKeyvault(self.keyvault.address, channel, timeout=2.0)
        self.clients.append(client)
        host = StateHost(
            settings,
            store=store,
            keyvault=client,
            enclave_factory=lambda: enclave_factory(settings),
            backoff=Backoff(initial_s=0.05, max_s=0.5),  # quick retries keep the tests short
        )
        host.start()
        self.hosts.append(host)
        return host

    def serving(self, platform: str = "a", **kwargs: object) -> StateHost:
        """Start a host and wait until it serves."""
        host = self.host(platform, **kwargs)  # type: ignore[arg-type]
        step = host.wait_until(READY, 30)
        assert step == lifecycle.SERVING, host.lifecycle.current()
        return host

    def stop_all(self) -> None:
        for host in self.hosts:
            host.stop()
        self.hosts.clear()
        for store in self.stores:
            store.close()
        self.stores.clear()
        for client in self.clients:
            client.close()
        self.clients.clear()


@dataclass
class TokenSetup:
    """A token instance with an issuer and some accounts."""

    instance_id: str
    issuer: Account
    accounts: list[Account]


def token_instance(
    host: StateHost, instance_id: str = "tokens", accounts: int = 2, *, fast: bool = False
) -> TokenSetup:
    """Create a token instance on `host`; the issuer and `accounts` holders sign their commands.

    `fast`: answers leave once durable, without waiting for the keyvault (ACKNOWLEDGMENT_FAST).
    """
    keys = host.attestation_bundle().keys
    issuer_key = ed25519.Ed25519PrivateKey.generate()
    config = token_config(issuer_key)
    if fast:
        config.acknowledgment = envelope_pb2.ACKNOWLEDGMENT_FAST
    host.create_instance(instance_id, config, request_id=f"create-{instance_id}", timeout=10)
    issuer = Account(keys, instance_id, signer=issuer_key)
    holders = [
        Account(keys, instance_id, signer=ed25519.Ed25519PrivateKey.generate()) for _ in range(accounts)
    ]
    return TokenSetup(instance_id, issuer, holders)


def token_issuer_served(stub: state_pb2_grpc.StateServiceStub, instance_id: str) -> Account:
    """Create a token instance through the served StateService; its issuer, with a fresh key."""
    keys = stub.GetAttestation(state_pb2.GetAttestationRequest(), timeout=5).bundle.keys
    issuer_key = ed25519.Ed25519PrivateKey.generate()
    request = state_pb2.CreateInstanceRequest(
        instance_id=instance_id, config=token_config(issuer_key), request_id=f"create-{instance_id}"
    )
    stub.CreateInstance(request, timeout=10)
    return Account(keys, instance_id, signer=issuer_key)


def rebind(account: Account, keys: envelope_pb2.EnclavePublicKeys) -> Account:
    """The same account (key and counter) talking to a restarted enclave (new public keys)."""
    account.keys = keys
    return account


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a live WAL-mode SQLite database (an operator's backup)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def replace_database(node: Node, backup: Path) -> None:
    """Put an older copy in place of the node's database (the rollback attack); hosts are stopped."""
    for store in node.stores:
        store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(node.database) + suffix).unlink(missing_ok=True)
    copy_database(backup, node.database)


def keyvault_head(node: Node, instance_id: str) -> int:
    """The instance's commit head sequence at the keyvault, read as the state service."""
    return node.clients[-1].get_commit_head(instance_id).sequence


def wait_for_keyvault_head(node: Node, instance_id: str, sequence: int, timeout: float = 20.0) -> None:
    """Poll the keyvault (which may still be reconnecting) until it holds `sequence`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if keyvault_head(node, instance_id) >= sequence:
                return
        except KeyvaultUnavailable:
            pass  # the channel reconnects with gRPC's backoff after an outage
        if time.monotonic() > deadline:
            raise AssertionError(f"keyvault head of {instance_id} stuck below {sequence}")
        time.sleep(0.05)


def flip_byte(database: Path, instance_id: str, sequence: int, *, fix_hash: bool = False) -> None:
    """Flip one ciphertext byte of one stored entry (optionally recomputing its stored hash too)."""
    with closing(sqlite3.connect(database)) as conn, conn:
        (blob,) = conn.execute(
            "SELECT entry FROM st_entries WHERE instance_id = ? AND sequence = ?", (instance_id, sequence)
        ).fetchone()
        entry = envelope_pb2.LogEntry.FromString(blob)
        ciphertext = bytearray(entry.ciphertext)
        ciphertext[len(ciphertext) // 2] ^= 0x01
        entry.ciphertext = bytes(ciphertext)
        digest = wire.entry_hash(entry) if fix_hash else None
        conn.execute(
            "UPDATE st_entries SET entry = ?, entry_hash = coalesce(?, entry_hash) "
            "WHERE instance_id = ? AND sequence = ?",
            (entry.SerializeToString(), digest, instance_id, sequence),
        )


def make_entries(
    instance_id: str,
    first: int,
    count: int,
    previous: bytes = wire.ZERO_HASH,
    *,
    key_versions: Sequence[int] = (),
) -> list[StoredEntry]:
    """`count` chained entries shaped like the enclave's (random ciphertext; key version 1
    unless `key_versions` gives one per entry)."""
    entries = []
    for offset, sequence in enumerate(range(first, first + count)):
        entry = envelope_pb2.LogEntry(
            instance_id=instance_id,
            sequence=sequence,
            key_version=key_versions[offset] if key_versions else 1,
            previous_hash=previous,
            nonce=secrets.token_bytes(12),
            ciphertext=secrets.token_bytes(48),
        )
        entries.append(StoredEntry.of(entry))
        previous = entries[-1].entry_hash
    return entries


@dataclass
class MemoryLog:
    """The read side of a StateStore over rows in memory (a log the tests may damage freely)."""

    rows: list[StoredEntry]
    stored_snapshot: StoredSnapshot | None = None

    def snapshot(self, instance_id: str) -> StoredSnapshot | None:
        return self.stored_snapshot

    def entries(self, instance_id: str, *, after: int, through: int | None = None) -> list[StoredEntry]:
        top = through if through is not None else 2**63
        return [r for r in self.rows if r.instance_id == instance_id and after < r.sequence <= top]

    def head(self, instance_id: str) -> StoredHead | None:
        snapshot = self.stored_snapshot.sequence if self.stored_snapshot else 0
        last = max([snapshot, *(r.sequence for r in self.rows if r.instance_id == instance_id)])
        at = [r.entry_hash for r in self.rows if r.instance_id == instance_id and r.sequence == last]
        return StoredHead(last, at[-1] if at else None)

    def store(self) -> StateStore:
        return cast("StateStore", self)
