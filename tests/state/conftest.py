"""Fixtures of the state tests: one store factory parametrized over SQLite and PostgreSQL.

The PostgreSQL variant is marked `postgres` and really connects to 127.0.0.1:5432; if the
server is down the tests fail (they never skip). Each test gets its own schema, dropped after.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.state.support import Keyvault, Node
from veil.services.common.config import ServiceConfig
from veil.services.state.store import StateStore
from veil.services.state.store_postgres import PostgresStore
from veil.services.state.store_sqlite import SqliteStore

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

StoreFactory = Callable[[], StateStore]
"""Opens a new store object over the same database (a restart reopens it)."""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[StateStore] = []
    schema = f"veil_state_test_{uuid.uuid4().hex[:16]}"

    def make() -> StateStore:
        store: StateStore
        if request.param == "sqlite":
            store = SqliteStore(tmp_path / "state.db")
        else:
            store = PostgresStore(POSTGRES_URL, schema=schema)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    if request.param == "postgres":
        cleaner = PostgresStore(POSTGRES_URL, schema=schema)
        cleaner.drop_schema()
        cleaner.close()


@pytest.fixture
def store(open_store: StoreFactory) -> StateStore:
    return open_store()


@pytest.fixture
def keyvault(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path
) -> Iterator[Keyvault]:
    """A real keyvault server (in-process, dev attestation root), running."""
    directory = tmp_path / "keyvault"
    directory.mkdir()
    server = Keyvault(service_config("keyvault"), pki_dir, directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def node(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path, keyvault: Keyvault
) -> Iterator[Node]:
    """A state node's data dir; `node.serving()` starts a host over it (again and again)."""
    directory = tmp_path / "node"
    directory.mkdir()
    created = Node(service_config("state"), pki_dir, directory, keyvault)
    yield created
    created.stop_all()
