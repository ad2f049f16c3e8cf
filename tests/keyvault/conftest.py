"""Fixtures for the keyvault libraries: stores (SQLite and real PostgreSQL), KEKs, SoftHSM2.

``store`` is parametrized over both backends, so every test that uses it (directly or via
the key, head, token and audit fixtures) runs against SQLite and against the PostgreSQL
server on 127.0.0.1:5432 (marked ``postgres``; each test gets its own schema, dropped
afterwards, so parallel runs do not collide).

``keyvault_server`` serves the simulated keyvault over mTLS on port 0; ``stub`` makes stubs to
it called as any identity of the dev PKI.

``softhsm`` sets up a private SoftHSM2 token directory for the session and initialises a
token with ``softhsm2-util``. It fails -- it does not skip -- when SoftHSM2 is missing: the
project's set-up installs it (``apt-get install -y softhsm2``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import tls_for
from veil.keyvault.v1 import keyvault_pb2_grpc
from veil.services.common.config import ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.common.tls import channel_credentials
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.enclave_policy import EnclavePolicy
from veil.services.keyvault.heads import CommitHeads
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.keys import KeyManager
from veil.services.keyvault.release_key import ReleaseSigner
from veil.services.keyvault.server import create_server
from veil.services.keyvault.store import Store
from veil.services.keyvault.store_postgres import PostgresStore
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.keyvault.tokens import SigningKeyRing, TokenIssuer, TokenVerifier

from .support import (
    ISSUER,
    POSTGRES_DSN,
    FakeClock,
    FakeEnclave,
    SoftHsm,
    Stubs,
    fixed_release_signer,
    operator_policy,
    sim_keyvault_config,
)

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_postgres_store() -> PostgresStore:
    """A store in a fresh, uniquely named schema (drop it with ``drop_schema``)."""
    return PostgresStore(POSTGRES_DSN, schema=f"kvtest_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "keyvault.db")
        yield sqlite
        sqlite.close()
        return
    postgres = open_postgres_store()
    try:
        yield postgres
    finally:
        postgres.drop_schema()
        postgres.close()


@pytest.fixture
def replica(store: Store) -> Iterator[Store]:
    """A second store over the same database: another keyvault replica."""
    other: Store
    if isinstance(store, SqliteStore):
        other = SqliteStore(store.path)
    else:
        assert isinstance(store, PostgresStore)
        other = PostgresStore(POSTGRES_DSN, schema=store.schema)
    yield other
    other.close()


@pytest.fixture
def kek(tmp_path: Path) -> FileKek:
    return FileKek(tmp_path / "kek" / "kek.bin")


@pytest.fixture
def audit(store: Store, clock: FakeClock) -> AuditLog:
    return AuditLog(store, clock)


@pytest.fixture
def ring(store: Store, kek: FileKek, clock: FakeClock, audit: AuditLog) -> SigningKeyRing:
    return SigningKeyRing(store, kek, clock, audit)


@pytest.fixture
def issuer(ring: SigningKeyRing, clock: FakeClock) -> TokenIssuer:
    return TokenIssuer(ring, issuer=ISSUER, clock=clock)


@pytest.fixture
def verifier(ring: SigningKeyRing, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(ring, issuer=ISSUER, clock=clock)


@pytest.fixture
def release_signer() -> ReleaseSigner:
    """The fixed test release key, which FakeEnclave pins by default."""
    return fixed_release_signer()


@pytest.fixture
def enclave_policy() -> EnclavePolicy:
    """The operator enclave policy: the default FakeEnclave's build (MRENCLAVE, MRSIGNER, SVN >= 1)."""
    return operator_policy()


@pytest.fixture
def deps(
    store: Store,
    kek: FileKek,
    audit: AuditLog,
    clock: FakeClock,
    verifier: TokenVerifier,
    release_signer: ReleaseSigner,
    enclave_policy: EnclavePolicy,
) -> Deps:
    """What the key manager and the commit heads share (vary one with ``dataclasses.replace``)."""
    return Deps(store, kek, audit, clock, verifier, release_signer, enclave_policy)


@pytest.fixture
def keys(deps: Deps) -> KeyManager:
    return KeyManager(deps)


@pytest.fixture
def heads(deps: Deps) -> CommitHeads:
    return CommitHeads(deps)


@pytest.fixture
def enclave() -> FakeEnclave:
    return FakeEnclave()


@pytest.fixture
def keyvault_server(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path
) -> Iterator[VeilServer]:
    config = sim_keyvault_config(tmp_path / "kv", pki_dir, tmp_path)
    server, _ = create_server(service_config("keyvault"), keyvault_config=config)
    server.start()
    yield server
    server.stop(0)


@pytest.fixture
def stub(keyvault_server: VeilServer, pki_dir: Path) -> Iterator[Stubs]:
    """Stubs to the served keyvault, each called as the given identity (a channel each, closed after)."""
    channels: list[grpc.Channel] = []

    def make(identity: str) -> keyvault_pb2_grpc.KeyvaultServiceStub:
        channel = grpc.secure_channel(
            f"127.0.0.1:{keyvault_server.port}", channel_credentials(tls_for(pki_dir, identity))
        )
        channels.append(channel)
        return keyvault_pb2_grpc.KeyvaultServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    util = shutil.which("softhsm2-util")
    module = next((path for path in SOFTHSM_MODULES if Path(path).is_file()), None)
    if util is None or module is None:
        pytest.fail(
            "SoftHSM2 is not installed (softhsm2-util and libsofthsm2.so are required for the PKCS#11 "
            "KEK tests); install it with `apt-get install -y softhsm2` (part of `make setup`)"
        )
    root = tmp_path_factory.mktemp("softhsm")
    tokens = root / "tokens"
    tokens.mkdir()
    config = root / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    label, pin = "veil-test", "1234"
    with pytest.MonkeyPatch.context() as patch:
        # SoftHSM reads SOFTHSM2_CONF when the module initialises, in this process too.
        patch.setenv("SOFTHSM2_CONF", str(config))
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "5678"],
            check=True,
            capture_output=True,
            env=os.environ.copy(),
        )
        yield SoftHsm(module=module, token_label=label, pin=pin, config=config)
