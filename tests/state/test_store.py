"""The shared state-store suite: every test runs against SQLite and the real PostgreSQL server."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.state.conftest import POSTGRES_URL, StoreFactory
from tests.state.support import make_entries
from veil.enclave.v1 import envelope_pb2
from veil.services.state.errors import SequenceConflict, StoreError
from veil.services.state.store import (
    IdempotencyRecord,
    InstanceRecord,
    StateStore,
    StoredEntry,
    StoredSnapshot,
    open_store,
)
from veil.services.state.store_postgres import PostgresStore
from veil.services.state.store_sqlite import SqliteStore

CONFIG = envelope_pb2.InstanceConfig(
    app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_NONE
)


def create(store: StateStore, instance_id: str) -> StoredEntry:
    genesis = make_entries(instance_id, 1, 1)[0]
    assert store.create_instance(InstanceRecord(instance_id, CONFIG.SerializeToString(), 1_000), genesis)
    return genesis


def response(instance_id: str, request_id: str, payload: bytes = b"first") -> IdempotencyRecord:
    return IdempotencyRecord(instance_id, request_id, payload, created_us=int(time.time() * 1e6))


def test_the_catalogue_lists_instances_with_their_config(store: StateStore) -> None:
    create(store, "b-inst")
    create(store, "a-inst")
    listed = store.list_instances()
    assert [r.instance_id for r in listed] == ["a-inst", "b-inst"]
    assert envelope_pb2.InstanceConfig.FromString(listed[0].config) == CONFIG
    assert store.get_instance("a-inst") == listed[0]
    assert store.get_instance("missing") is None


def test_creating_an_existing_instance_changes_nothing(store: StateStore) -> None:
    genesis = create(store, "inst")
    other = make_entries("inst", 1, 1)[0]
    assert not store.create_instance(InstanceRecord("inst", b"other", 2_000), other)
    assert store.get_instance("inst") == InstanceRecord("inst", CONFIG.SerializeToString(), 1_000)
    assert store.load("inst").entries == [genesis]


def test_the_genesis_entry_must_be_sequence_one(store: StateStore) -> None:
    with pytest.raises(SequenceConflict):
        store.create_instance(InstanceRecord("inst", b"", 1), make_entries("inst", 2, 1)[0])
    assert store.list_instances() == []


def test_a_batch_over_several_instances_is_appended_in_order(store: StateStore) -> None:
    a, b = create(store, "a"), create(store, "b")
    batch_a = make_entries("a", 2, 3, a.entry_hash)
    batch_b = make_entries("b", 2, 2, b.entry_hash)
    store.append_batch([*batch_a, *batch_b], [response("a", "r1"), response("b", "r1", b"other")])
    assert store.load("a").entries == [a, *batch_a]
    assert store.load("b").entries == [b, *batch_b]
    head = store.head("a")
    assert head is not None
    assert (head.sequence, head.entry_hash) == (4, batch_a[-1].entry_hash)
    assert store.get_response("a", "r1") == b"first"
    assert store.get_response("b", "r1") == b"other"  # request ids are scoped by instance
    assert store.entries("a", after=2, through=3) == batch_a[1:2]


@pytest.mark.parametrize(
    ("first", "why"),
    [(2, "duplicate sequence"), (4, "gap after the head")],
)
def test_an_append_that_does_not_continue_the_log_changes_nothing(
    store: StateStore, first: int, why: str
) -> None:
    a, b = create(store, "a"), create(store, "b")
    store.append_batch(make_entries("a", 2, 1, a.entry_hash), [])
    good_b = make_entries("b", 2, 2, b.entry_hash)
    bad_a = make_entries("a", first, 1)
    with pytest.raises(SequenceConflict):
        store.append_batch([*good_b, *bad_a], [response("b", "r1")])
    # All or nothing: the good instance's entries and the responses were not written either.
    assert [e.sequence for e in store.load("a").entries] == [1, 2], why
    assert [e.sequence for e in store.load("b").entries] == [1]
    assert store.get_response("b", "r1") is None


def test_entries_of_one_instance_must_be_contiguous_within_a_batch(store: StateStore) -> None:
    genesis = create(store, "a")
    entries = make_entries("a", 2, 3, genesis.entry_hash)
    with pytest.raises(SequenceConflict):
        store.append_batch([entries[0], entries[2]], [])
    assert store.load("a").entries == [genesis]


def test_appending_to_an_unknown_instance_is_refused(store: StateStore) -> None:
    with pytest.raises(SequenceConflict):
        store.append_batch(make_entries("ghost", 1, 1), [])
    assert store.head("ghost") is None


def test_a_request_id_keeps_its_first_response(store: StateStore) -> None:
    genesis = create(store, "a")
    entries = make_entries("a", 2, 2, genesis.entry_hash)
    store.append_batch(entries[:1], [response("a", "req", b"first")])
    store.append_batch(entries[1:], [response("a", "req", b"second")])
    assert store.get_response("a", "req") == b"first"
    assert store.get_response("a", "other") is None


def test_old_responses_are_pruned(store: StateStore) -> None:
    create(store, "a")
    store.append_batch(
        [], [IdempotencyRecord("a", "old", b"x", created_us=10), IdempotencyRecord("a", "new", b"y", 30)]
    )
    assert store.prune_responses(created_before_us=20) == 1
    assert store.get_response("a", "old") is None
    assert store.get_response("a", "new") == b"y"


def test_load_returns_the_latest_snapshot_and_the_entries_after_it(store: StateStore) -> None:
    genesis = create(store, "a")
    entries = make_entries("a", 2, 9, genesis.entry_hash)  # sequences 2..10
    store.append_batch(entries, [])
    assert store.put_snapshot(StoredSnapshot("a", 4, b"snap-4"))
    assert store.put_snapshot(StoredSnapshot("a", 7, b"snap-7"))
    assert not store.put_snapshot(StoredSnapshot("a", 5, b"snap-5"))  # older: ignored
    loaded = store.load("a")
    assert loaded.snapshot == StoredSnapshot("a", 7, b"snap-7")
    assert [e.sequence for e in loaded.entries] == [8, 9, 10]
    assert store.snapshot("a") == loaded.snapshot  # what recovery reads before the entries
    assert store.snapshot("b") is None


def test_a_snapshot_past_the_head_is_refused(store: StateStore) -> None:
    create(store, "a")
    with pytest.raises(SequenceConflict):
        store.put_snapshot(StoredSnapshot("a", 2, b"future"))
    assert store.load("a").snapshot is None


def test_compaction_deletes_only_entries_a_snapshot_covers(store: StateStore) -> None:
    genesis = create(store, "a")
    entries = make_entries("a", 2, 5, genesis.entry_hash)  # 2..6
    store.append_batch(entries, [])
    with pytest.raises(SequenceConflict):
        store.compact("a", 3)  # no snapshot yet
    store.put_snapshot(StoredSnapshot("a", 4, b"snap"))
    with pytest.raises(SequenceConflict):
        store.compact("a", 5)  # beyond the snapshot
    assert store.compact("a", 3) == 3
    assert [e.sequence for e in store.entries("a", after=0)] == [4, 5, 6]
    assert [e.sequence for e in store.load("a").entries] == [5, 6]


def test_the_log_continues_after_everything_is_compacted(store: StateStore) -> None:
    genesis = create(store, "a")
    entries = make_entries("a", 2, 2, genesis.entry_hash)  # 2..3
    store.append_batch(entries, [])
    store.put_snapshot(StoredSnapshot("a", 3, b"snap"))
    assert store.compact("a", 3) == 3
    head = store.head("a")
    assert head is not None
    assert (head.sequence, head.entry_hash) == (3, None)
    more = make_entries("a", 4, 1, entries[-1].entry_hash)
    store.append_batch(more, [])
    assert store.load("a").entries == more
    with pytest.raises(SequenceConflict):
        store.append_batch(make_entries("a", 2, 1), [])  # below the snapshot: still a conflict


def test_everything_survives_reopening(open_store: StoreFactory) -> None:
    first = open_store()
    genesis = create(first, "a")
    entries = make_entries("a", 2, 3, genesis.entry_hash)
    first.append_batch(entries, [response("a", "r")])
    first.put_snapshot(StoredSnapshot("a", 2, b"snap"))
    first.close()
    reopened = open_store()
    loaded = reopened.load("a")
    assert loaded.snapshot == StoredSnapshot("a", 2, b"snap")
    assert loaded.entries == entries[1:]
    assert reopened.get_response("a", "r") == b"first"


def test_concurrent_writers_to_one_instance_cannot_fork_its_log(open_store: StoreFactory) -> None:
    setup = open_store()
    genesis = create(setup, "a")
    # Two hosts (separate store objects) both believe they are at head 1 and append sequence 2.
    writers = [open_store(), open_store()]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(writers))

    def append(writer: StateStore) -> None:
        batch = make_entries("a", 2, 5, genesis.entry_hash)
        barrier.wait()
        try:
            writer.append_batch(batch, [])
            outcomes.append("ok")
        except SequenceConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=append, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict", "ok"]
    assert [e.sequence for e in setup.load("a").entries] == [1, 2, 3, 4, 5, 6]


def test_reads_from_many_threads_while_appending(store: StateStore) -> None:
    genesis = create(store, "a")
    entries = make_entries("a", 2, 200, genesis.entry_hash)
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                sequences = [e.sequence for e in store.load("a").entries]
                assert sequences == list(range(1, len(sequences) + 1))
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    for start in range(0, 200, 20):
        store.append_batch(entries[start : start + 20], [])
    done.set()
    for reader in readers:
        reader.join()
    assert errors == []
    assert len(store.load("a").entries) == 201


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: os.PathLike[str]) -> None:
    store = open_store(os.path.join(tmp_path, "sub", "state.db"))
    assert isinstance(store, SqliteStore)
    conn = store._db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


@pytest.mark.postgres
def test_postgres_is_selected_by_url_and_commits_synchronously() -> None:
    store = open_store(POSTGRES_URL, schema=f"veil_state_test_{os.getpid()}")
    assert isinstance(store, PostgresStore)
    try:
        conn = store._db.connection()
        row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row is not None
        assert row[0] == "on"
    finally:
        store.drop_schema()
        store.close()


@pytest.mark.postgres
def test_an_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=2)


@pytest.mark.parametrize("schema", ["x; DROP TABLE y", "veil\n"])  # "$" passed a final newline
def test_a_bad_schema_name_is_refused(schema: str) -> None:
    with pytest.raises(StoreError, match="schema"):
        PostgresStore(POSTGRES_URL, schema=schema)
