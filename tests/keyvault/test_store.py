"""The shared store suite: every test runs against SQLite and against the real PostgreSQL server."""

from __future__ import annotations

import pytest

from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.errors import StoreError
from veil.services.keyvault.store import (
    GENESIS_HASH,
    AuditRecord,
    CommitHeadRecord,
    KeyRecord,
    KeyVersionRecord,
    SigningKeyRecord,
    Store,
)

from .support import FakeClock, run_concurrently


def key(name: str = "orders", version: int = 1) -> KeyRecord:
    return KeyRecord(
        name=name, policy_json="{}", latest_version=version, created_us=10, updated_us=10, destroyed=False
    )


def head(sequence: int, fill: int = 1, instance: str = "inst-1") -> CommitHeadRecord:
    return CommitHeadRecord(
        instance_id=instance,
        sequence=sequence,
        hash=bytes([fill]) * 32,
        genesis_hash=b"g" * 32,
        config_hash=b"c" * 32,
        signing_public_key=b"k" * 32,
        updated_us=sequence,
    )


def test_keys_and_versions(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.insert_key(key("b-key"))
        assert tx.insert_key(key("a-key"))
        assert not tx.insert_key(key("a-key"))  # insert-if-absent
        assert tx.insert_key_version(KeyVersionRecord("a-key", 1, "file-1", b"\x00wrapped\xff", 11))
        assert not tx.insert_key_version(KeyVersionRecord("a-key", 1, "file-1", b"other", 12))
    with store.transaction() as tx:
        assert [k.name for k in tx.list_keys()] == ["a-key", "b-key"]
        assert tx.get_key("a-key", lock=True) == key("a-key")
        assert tx.get_key("nope") is None
        version = tx.get_key_version("a-key", 1)
        assert version is not None
        assert version.wrapped == b"\x00wrapped\xff"
        assert version.kek_id == "file-1"
        tx.update_key(KeyRecord("a-key", "{}", 1, 10, 20, True))
        assert tx.delete_key_versions("a-key") == 1
    with store.transaction() as tx:
        stored = tx.get_key("a-key")
        assert stored is not None
        assert stored.destroyed
        assert stored.updated_us == 20
        assert tx.get_key_version("a-key", 1) is None
        with pytest.raises(StoreError):
            tx.update_key(key("never-inserted"))


def test_transaction_rolls_back_on_error(store: Store) -> None:
    def insert_then_fail() -> None:
        with store.transaction() as tx:
            tx.insert_key(key())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        insert_then_fail()
    with store.transaction() as tx:
        assert tx.get_key("orders") is None


def test_signing_keys(store: Store) -> None:
    with store.transaction() as tx:
        for kid, created in (("k1", 1), ("k2", 2), ("k3", 3)):
            tx.insert_signing_key(SigningKeyRecord(kid, b"wrapped-" + kid.encode(), "{}", created, None))
        assert tx.retire_signing_keys(except_kid="k3", retired_us=100) == 2
    with store.transaction() as tx:
        keys = tx.list_signing_keys()
        assert [(k.kid, k.retired_us) for k in keys] == [("k1", 100), ("k2", 100), ("k3", None)]
        assert keys[0].wrapped_private == b"wrapped-k1"
        assert tx.delete_signing_keys_retired_before(101) == 2
        assert [k.kid for k in tx.list_signing_keys()] == ["k3"]


def test_jti_is_used_once_and_purged_after_expiry(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.use_jti("jti-1", 1_000)
        assert not tx.use_jti("jti-1", 1_000)
        assert tx.use_jti("jti-2", 5_000)
    with store.transaction() as tx:
        assert tx.purge_jtis(2_000) == 1
        assert tx.use_jti("jti-1", 9_000)  # forgotten once expired (its token is dead anyway)
        assert not tx.use_jti("jti-2", 9_000)


def test_commit_head_compare_and_set(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.get_head("inst-1") is None
        assert tx.insert_head(head(1))
        assert not tx.insert_head(head(5))
        assert not tx.replace_head(head(2), expected_sequence=1, expected_hash=b"\x09" * 32)
        assert tx.replace_head(head(2, 2), expected_sequence=1, expected_hash=b"\x01" * 32)
        assert not tx.replace_head(head(3), expected_sequence=1, expected_hash=b"\x01" * 32)
    with store.transaction() as tx:
        assert tx.get_head("inst-1") == head(2, 2)


def test_audit_rows_and_tip(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.audit_tip() == (0, GENESIS_HASH)
        event = AuditRecord(1, 5, "create", "allowed", "me", "{}", GENESIS_HASH, b"h" * 32)
        tx.insert_audit(event)
        assert tx.audit_tip() == (1, b"h" * 32)
        assert tx.list_audit(after_sequence=0, limit=10) == [event]
        # An append that does not extend the tip is refused.
        with pytest.raises(StoreError):
            tx.insert_audit(AuditRecord(3, 5, "create", "allowed", "me", "{}", b"h" * 32, b"i" * 32))


def test_audit_rows_are_append_only_in_the_database(store: Store, clock: FakeClock) -> None:
    AuditLog(store, clock).record(action="create", outcome="allowed", caller="me", detail={})
    for statement in ("UPDATE kv_audit_events SET caller = 'x'", "DELETE FROM kv_audit_events"):
        with pytest.raises(StoreError, match="append-only"), store.transaction() as tx:
            tx._run(statement)  # type: ignore[attr-defined]  # raw SQL: what an intruder would try


def test_idempotency_claims(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.claim_request("req-1", "create", "fp", 1) is None
        tx.complete_request("req-1", '{"ok":true}')
    with store.transaction() as tx:
        prior = tx.claim_request("req-1", "create", "fp", 2)
        assert prior is not None
        assert (prior.operation, prior.fingerprint, prior.result_json) == ("create", "fp", '{"ok":true}')
        with pytest.raises(StoreError):
            tx.complete_request("req-1", "again")

    def claim_then_fail() -> None:
        with store.transaction() as tx:
            assert tx.claim_request("req-2", "create", "fp", 3) is None
            raise RuntimeError("effect failed")

    with pytest.raises(RuntimeError):
        claim_then_fail()
    with store.transaction() as tx:
        assert tx.claim_request("req-2", "create", "fp", 4) is None  # the failed attempt left nothing


def test_data_survives_reopening(store: Store, replica: Store) -> None:
    with store.transaction() as tx:
        tx.insert_key(key())
    with replica.transaction() as tx:
        assert tx.get_key("orders") == key()


def test_concurrent_audit_appends_from_two_replicas_do_not_fork(
    store: Store, replica: Store, clock: FakeClock
) -> None:
    logs = [AuditLog(store, clock), AuditLog(replica, clock)]

    def append(index: int) -> None:
        for n in range(5):
            logs[index % 2].record(action="create", outcome="allowed", caller=f"t{index}", detail={"n": n})

    run_concurrently(8, append)
    assert logs[0].verify_chain() == 40
    page = logs[1].list_events(page_size=1000)
    assert [e.sequence for e in page.events] == list(range(1, 41))


def test_concurrent_head_compare_and_set_has_one_winner(store: Store, replica: Store) -> None:
    with store.transaction() as tx:
        tx.insert_head(head(1))
    stores = [store, replica]

    def advance(index: int) -> bool:
        with stores[index % 2].transaction() as tx:
            return tx.replace_head(head(2, 10 + index), expected_sequence=1, expected_hash=b"\x01" * 32)

    assert sorted(run_concurrently(6, advance)) == [False] * 5 + [True]


def test_concurrent_insert_if_absent_has_one_winner(store: Store, replica: Store) -> None:
    stores = [store, replica]

    def insert(index: int) -> bool:
        with stores[index % 2].transaction() as tx:
            return tx.insert_key(key()) and tx.use_jti("shared", 1)

    assert sorted(run_concurrently(6, insert)) == [False] * 5 + [True]
