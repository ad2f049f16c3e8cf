"""Audit log: hash chain, verification, tamper detection (even past the DB triggers), paging."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from veil.services.keyvault.audit import AuditLog, canonical_json, event_hash
from veil.services.keyvault.errors import AuditChainError, InvalidArgumentError
from veil.services.keyvault.store import GENESIS_HASH, Store
from veil.services.keyvault.store_sqlite import SqliteStore

from .support import FakeClock


def fill(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.record(
            action="release",
            outcome="refused" if n % 2 else "allowed",
            caller="spiffe://veil/state",
            detail={"n": n},
        )


def raw(store: Store, statement: str) -> None:
    """Run SQL as an intruder with database access would."""
    with store.transaction() as tx:
        tx._run(statement)  # type: ignore[attr-defined]


def drop_guards(store: Store) -> None:
    if isinstance(store, SqliteStore):
        raw(store, "DROP TRIGGER kv_audit_no_update")
        raw(store, "DROP TRIGGER kv_audit_no_delete")
    else:
        raw(store, "DROP TRIGGER kv_audit_no_change ON kv_audit_events")


def test_events_are_chained(audit: AuditLog, clock: FakeClock) -> None:
    first = audit.record(
        action="create", outcome="allowed", caller="spiffe://veil/admin", detail={"key": "k"}
    )
    clock.advance(1.5)
    second = audit.record(
        action="destroy", outcome="allowed", caller="spiffe://veil/admin", detail={"key": "k"}
    )
    assert first.sequence == 1
    assert first.previous_hash == GENESIS_HASH
    assert second.previous_hash == first.hash
    assert second.time_us - first.time_us == 1_500_000
    # The documented encoding, recomputed independently.
    body = (
        '{"action":"create","caller":"spiffe://veil/admin","detail_json":"{\\"key\\":\\"k\\"}",'
        f'"outcome":"allowed","sequence":1,"time_us":{first.time_us}}}'
    )
    assert first.hash == hashlib.sha256(GENESIS_HASH + body.encode()).digest()
    assert first.detail_json == canonical_json({"key": "k"})
    assert audit.verify_chain() == 2


def test_empty_chain_verifies(audit: AuditLog) -> None:
    assert audit.verify_chain() == 0


@pytest.mark.parametrize(
    "attack",
    [
        "UPDATE kv_audit_events SET detail_json = '{\"n\":99}' WHERE sequence = 3",
        "UPDATE kv_audit_events SET outcome = 'allowed' WHERE sequence = 2",
        "UPDATE kv_audit_events SET caller = 'spiffe://veil/admin' WHERE sequence = 5",
        "UPDATE kv_audit_events SET time_us = time_us + 1 WHERE sequence = 1",
        "DELETE FROM kv_audit_events WHERE sequence = 3",
        "DELETE FROM kv_audit_events WHERE sequence = 6",
    ],
)
def test_tampering_is_detected(store: Store, audit: AuditLog, attack: str) -> None:
    fill(audit, 6)
    drop_guards(store)
    raw(store, attack)
    with pytest.raises(AuditChainError) as caught:
        audit.verify_chain()
    assert caught.value.reason == "AUDIT_CHAIN_BROKEN"
    assert 1 <= caught.value.sequence <= 6


def test_rewriting_an_event_with_a_fresh_hash_breaks_the_link(store: Store, audit: AuditLog) -> None:
    fill(audit, 4)
    drop_guards(store)
    events = audit.list_events().events
    forged = event_hash(events[1].previous_hash, replace(events[1], outcome="allowed"))  # event 2
    literal = f"X'{forged.hex()}'" if store.backend == "sqlite" else f"decode('{forged.hex()}', 'hex')"
    raw(store, f"UPDATE kv_audit_events SET outcome = 'allowed', hash = {literal} WHERE sequence = 2")
    with pytest.raises(AuditChainError, match="event 3 does not link"):
        audit.verify_chain()


def test_paging(audit: AuditLog) -> None:
    fill(audit, 7)
    first = audit.list_events(page_size=3)
    assert [e.sequence for e in first.events] == [1, 2, 3]
    second = audit.list_events(page_size=3, page_token=first.next_page_token)
    third = audit.list_events(page_size=3, page_token=second.next_page_token)
    assert [e.sequence for e in second.events] == [4, 5, 6]
    assert [e.sequence for e in third.events] == [7]
    assert third.next_page_token == ""
    assert len(audit.list_events().events) == 7  # default page size
    for token in ("garbage!", "YXVkaXQtdjE6eA", "b3RoZXI6Mw"):
        with pytest.raises(InvalidArgumentError):
            audit.list_events(page_token=token)
    with pytest.raises(InvalidArgumentError):
        audit.list_events(page_size=-1)


def test_details_reject_floats(audit: AuditLog) -> None:
    with pytest.raises(InvalidArgumentError):
        audit.record(action="x", outcome="allowed", caller="c", detail={"ratio": 0.5})  # type: ignore[dict-item]
