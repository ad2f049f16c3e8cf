"""The release-signing key: created once per deployment, KEK-wrapped, stable across restarts and replicas."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from veil.services.keyvault.app import open_keyvault
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.config import KekConfig, KeyvaultConfig
from veil.services.keyvault.errors import StoreError
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.release_key import (
    ReleaseSigner,
    load_or_create_release_signer,
    release_key_aad,
)
from veil.services.keyvault.store import ReleaseKeyRecord, Store, StoreTx
from veil.services.keyvault.store_postgres import PostgresStore
from veil.services.keyvault.store_sqlite import SqliteStore

from .support import POSTGRES_DSN, FakeClock, run_concurrently, write_sim_enclave_policy


def reopen(store: Store) -> Store:
    """A new store object over the same database (a restarted or second keyvault process)."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path)
    assert isinstance(store, PostgresStore)
    return PostgresStore(POSTGRES_DSN, schema=store.schema)


def creations(audit: AuditLog) -> list[dict[str, str]]:
    events = audit.list_events(page_size=1000).events
    return [json.loads(e.detail_json) for e in events if e.action == "create_release_key"]


def test_created_once_audited_and_it_signs(
    store: Store, kek: FileKek, audit: AuditLog, clock: FakeClock
) -> None:
    signer = load_or_create_release_signer(store, kek, audit, clock)
    assert len(signer.public_key) == 32
    Ed25519PublicKey.from_public_bytes(signer.public_key).verify(signer.sign(b"m"), b"m")
    (created,) = creations(audit)
    assert created == {"release_public_key": signer.public_key.hex(), "kek_id": kek.key_id}
    with store.transaction() as tx:
        record = tx.get_release_key()
    assert record is not None
    assert record.public_key == signer.public_key
    assert record.kek_id == kek.key_id
    # Stored only KEK-wrapped, bound to its public half.
    private = signer.private_key.private_bytes_raw()
    assert private not in record.wrapped_private
    assert kek.unwrap(record.wrapped_private, release_key_aad(record.public_key)) == private
    assert audit.verify_chain() == 1


def test_survives_a_restart_over_the_same_store(
    store: Store, audit: AuditLog, clock: FakeClock, tmp_path: Path
) -> None:
    kek_file = tmp_path / "restart-kek.bin"
    first = load_or_create_release_signer(store, FileKek(kek_file), audit, clock)
    store.close()
    restarted = reopen(store)
    try:
        restarted_audit = AuditLog(restarted, clock)
        again = load_or_create_release_signer(restarted, FileKek(kek_file), restarted_audit, clock)
        assert again.public_key == first.public_key
        assert again.private_key.private_bytes_raw() == first.private_key.private_bytes_raw()
        assert len(creations(restarted_audit)) == 1  # loaded, not created again
    finally:
        restarted.close()


def test_replicas_starting_together_agree_on_one_key(
    store: Store, replica: Store, kek: FileKek, clock: FakeClock
) -> None:
    stores = [store, replica, store, replica]

    def start(index: int) -> ReleaseSigner:
        return load_or_create_release_signer(stores[index], kek, AuditLog(stores[index], clock), clock)

    signers = run_concurrently(len(stores), start)
    assert len({signer.public_key for signer in signers}) == 1
    audit = AuditLog(store, clock)
    assert len(creations(audit)) == 1
    assert audit.verify_chain() == 1


class _LostRace:
    """A store whose first ``get_release_key`` misses a row another replica just committed."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.backend = store.backend
        self.missed = False

    @contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        with self._store.transaction() as tx:
            yield self._wrap(tx)

    def _wrap(self, tx: StoreTx) -> Any:
        race = self

        class Tx:
            def __getattr__(self, name: str) -> Any:
                return getattr(tx, name)

            def get_release_key(self) -> ReleaseKeyRecord | None:
                if not race.missed:
                    race.missed = True
                    return None
                return tx.get_release_key()

        return Tx()

    def close(self) -> None:
        self._store.close()


def test_the_replica_that_loses_the_race_uses_the_winners_key(
    store: Store, replica: Store, kek: FileKek, clock: FakeClock
) -> None:
    winner = load_or_create_release_signer(store, kek, AuditLog(store, clock), clock)
    racing = _LostRace(replica)
    loser = load_or_create_release_signer(racing, kek, AuditLog(replica, clock), clock)
    assert racing.missed
    assert loser.public_key == winner.public_key
    assert len(creations(AuditLog(store, clock))) == 1


def test_insert_release_key_is_insert_if_absent(store: Store) -> None:
    first = ReleaseKeyRecord(public_key=b"\x01" * 32, kek_id="k", wrapped_private=b"w1", created_us=1)
    second = ReleaseKeyRecord(public_key=b"\x02" * 32, kek_id="k", wrapped_private=b"w2", created_us=2)
    with store.transaction() as tx:
        assert tx.get_release_key() is None
        assert tx.insert_release_key(first)
        assert not tx.insert_release_key(second)
    with store.transaction() as tx:
        assert tx.get_release_key() == first


def test_refuses_to_start_under_another_kek(
    store: Store, kek: FileKek, audit: AuditLog, clock: FakeClock, tmp_path: Path
) -> None:
    load_or_create_release_signer(store, kek, audit, clock)
    other = FileKek(tmp_path / "other-kek.bin")
    with pytest.raises(StoreError, match="does not unwrap under the configured KEK"):
        load_or_create_release_signer(store, other, audit, clock)
    assert len(creations(audit)) == 1  # and it did not quietly make a new key


def test_a_swapped_public_key_is_refused(
    store: Store, kek: FileKek, audit: AuditLog, clock: FakeClock
) -> None:
    # Someone with database access re-labels the row with their own public key.
    signer = load_or_create_release_signer(store, kek, audit, clock)
    forged = ReleaseKeyRecord(
        public_key=bytes(32),
        kek_id=kek.key_id,
        wrapped_private=kek.wrap(signer.private_key.private_bytes_raw(), release_key_aad(bytes(32))),
        created_us=0,
    )
    _replace_row(store, forged)
    with pytest.raises(StoreError, match="does not match its public key"):
        load_or_create_release_signer(store, kek, audit, clock)


def _replace_row(store: Store, record: ReleaseKeyRecord) -> None:
    """Overwrite the one release-key row behind the store's back (a tampering operator)."""
    update = "UPDATE kv_release_key SET public_key = {p}, wrapped_private = {p} WHERE id = 1"
    if isinstance(store, SqliteStore):
        with closing(sqlite3.connect(store.path)) as conn, conn:
            conn.execute(update.format(p="?"), (record.public_key, record.wrapped_private))
        return
    assert isinstance(store, PostgresStore)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as pg:
        pg.execute("SELECT set_config('search_path', %s, false)", (store.schema,))
        pg.execute(update.format(p="%s").encode(), (record.public_key, record.wrapped_private))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_open_keyvault_keeps_its_release_key_across_restarts(
    backend: str, tmp_path: Path, pki_dir: Path
) -> None:
    schema = f"kvtest_{uuid.uuid4().hex[:16]}"
    config = KeyvaultConfig(
        db=POSTGRES_DSN if backend == "postgres" else str(tmp_path / "kv" / "keyvault.db"),
        db_schema=schema,
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=write_sim_enclave_policy(tmp_path / "enclave-policy.json"),
    )
    first = open_keyvault(config)
    try:
        published = first.release_signer.public_key
    finally:
        first.close()
    second = open_keyvault(config)
    try:
        assert second.release_signer.public_key == published
        events = second.audit.list_events(page_size=1000).events
        assert [e.action for e in events].count("create_release_key") == 1
    finally:
        if isinstance(second.store, PostgresStore):
            second.store.drop_schema()
        second.close()
