"""Signed audit tips: a database writer who deletes an event and recomputes the chain is caught.

The attacker here can do anything in the database (drop or bypass the triggers, rewrite rows and
the tip) but does not hold the KEK, so cannot use the release key that signs every tip.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from veil.services.keyvault.audit import AuditLog, AuditVerifier, _encode_page_token, event_hash, verify_tip
from veil.services.keyvault.errors import AuditChainError
from veil.services.keyvault.store import GENESIS_HASH, Store
from veil.services.keyvault.store_sqlite import SqliteStore

from .support import FakeClock, fixed_release_signer


def signed_log(store: Store, clock: FakeClock, events: int) -> AuditLog:
    log = AuditLog(store, clock)
    log.attach_signer(fixed_release_signer())
    for n in range(events):
        log.record(
            action="release",
            outcome="allowed",
            caller="spiffe://veil/state",
            detail={"key": f"instance.i{n}", "version": 1},
        )
    return log


def run(store: Store, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Raw SQL with the database's full rights, triggers bypassed (what the database owner can do)."""
    with store.transaction() as tx:
        if store.backend == "postgres":
            tx._run("SET LOCAL session_replication_role = replica")  # type: ignore[attr-defined]
        cursor = tx._run(statement, params)  # type: ignore[attr-defined]
        return list(cursor.fetchall()) if cursor.description else []


def drop_sqlite_guards(store: Store) -> None:
    if isinstance(store, SqliteStore):
        for trigger in (
            "kv_audit_no_update",
            "kv_audit_no_delete",
            "kv_audit_append_at_tip",
            "kv_audit_signature_no_delete",
            "kv_audit_tip_forward",
        ):
            run(store, f"DROP TRIGGER {trigger}")


def delete_and_recompute(store: Store, victim: int, *, keep_signatures: bool) -> None:
    """Delete event ``victim``, renumber and rehash every later event, and move the tip to match."""
    drop_sqlite_guards(store)
    with store.transaction() as tx:
        events = tx.list_audit(after_sequence=0, limit=1000)
    kept = [e for e in events if e.sequence != victim]
    run(store, "DELETE FROM kv_audit_events WHERE sequence >= ?", (victim,))
    if not keep_signatures:
        run(store, "DELETE FROM kv_audit_signatures WHERE sequence >= ?", (victim,))
    previous = kept[victim - 2].hash if victim > 1 else GENESIS_HASH
    sequence = victim
    for event in kept[victim - 1 :]:
        digest = event_hash(previous, replace(event, sequence=sequence))
        run(
            store,
            "INSERT INTO kv_audit_events "
            "(sequence, time_us, action, outcome, caller, detail_json, previous_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sequence,
                event.time_us,
                event.action,
                event.outcome,
                event.caller,
                event.detail_json,
                previous,
                digest,
            ),
        )
        previous, sequence = digest, sequence + 1
    run(store, "UPDATE kv_audit_tip SET sequence = ?, hash = ? WHERE id = 1", (sequence - 1, previous))


def unsigned_chain_verifies(store: Store, clock: FakeClock) -> int:
    """What the log proved before tip signing: the plain hash chain."""
    return AuditLog(store, clock).verify_chain()


def test_every_tip_is_signed_by_the_release_key(store: Store, clock: FakeClock) -> None:
    log = signed_log(store, clock, 3)
    with store.transaction() as tx:
        events = tx.list_audit(after_sequence=0, limit=10)
    signer = fixed_release_signer()
    assert all(verify_tip(signer.public_key, e.sequence, e.hash, e.tip_signature) for e in events)
    tip = log.signed_tip()
    assert tip is not None
    assert (tip.sequence, tip.hash) == (3, events[-1].hash)
    assert verify_tip(tip.public_key, tip.sequence, tip.hash, tip.signature)
    assert not verify_tip(tip.public_key, tip.sequence - 1, tip.hash, tip.signature)
    assert log.verify_chain() == 3


@pytest.mark.parametrize("keep_signatures", [True, False])
def test_deleting_a_release_and_recomputing_the_chain_is_detected(
    store: Store, clock: FakeClock, keep_signatures: bool
) -> None:
    signed_log(store, clock, 6)
    delete_and_recompute(store, 3, keep_signatures=keep_signatures)
    # The forgery is a consistent hash chain: without signatures it would pass.
    assert unsigned_chain_verifies(store, clock) == 5
    # A keyvault (re)starting over it refuses (open_keyvault verifies), and so does ListAuditEvents.
    restarted = AuditLog(store, clock)
    restarted.attach_signer(fixed_release_signer())
    with pytest.raises(AuditChainError, match="signature") as caught:
        restarted.verify_chain()
    assert caught.value.reason == "AUDIT_CHAIN_BROKEN"
    with pytest.raises(AuditChainError):
        restarted.list_events()


def test_a_running_keyvault_catches_the_rewrite_on_list_and_periodically(
    store: Store, clock: FakeClock
) -> None:
    log = signed_log(store, clock, 6)
    assert len(log.list_events().events) == 6  # verified up to event 6
    delete_and_recompute(store, 2, keep_signatures=True)
    with pytest.raises(AuditChainError):
        log.list_events()
    verifier = AuditVerifier(log, interval_s=60)
    verifier.check()
    assert verifier.failure is not None
    assert verifier.failure.reason == "AUDIT_CHAIN_BROKEN"


def test_cutting_the_log_back_to_an_older_signed_tip(store: Store, clock: FakeClock) -> None:
    log = signed_log(store, clock, 5)
    published = log.signed_tip()  # what the operator published
    assert published is not None
    assert published.sequence == 5
    assert log.verify_chain(full=False) == 5  # the periodic check, before the cut
    drop_sqlite_guards(store)
    with store.transaction() as tx:
        third = tx.list_audit(after_sequence=2, limit=1)[0]
    run(store, "DELETE FROM kv_audit_events WHERE sequence > 3")
    run(store, "UPDATE kv_audit_tip SET sequence = 3, hash = ? WHERE id = 1", (third.hash,))
    # The running keyvault never accepts a tip below one it verified.
    with pytest.raises(AuditChainError, match="went back from event 5 to 3"):
        log.verify_chain()
    # A restarted one sees a validly signed older tip: only the published tip shows the cut.
    fresh = AuditLog(store, clock)
    fresh.attach_signer(fixed_release_signer())
    assert fresh.verify_chain() == 3
    with pytest.raises(AuditChainError, match="published tip 5"):
        fresh.check_published(published)


def test_an_event_rewritten_in_place_is_refused_on_list(store: Store, clock: FakeClock) -> None:
    log = signed_log(store, clock, 4)
    assert log.verify_chain() == 4
    drop_sqlite_guards(store)
    run(store, "UPDATE kv_audit_events SET outcome = 'refused' WHERE sequence = 2")
    with pytest.raises(AuditChainError, match="event 2 was altered"):
        log.list_events()
    with pytest.raises(AuditChainError, match="event 2 was altered"):
        log.list_events(page_size=1, page_token=log_token(1))


def log_token(sequence: int) -> str:
    return _encode_page_token(sequence)


def test_the_tip_only_moves_forward_onto_its_newest_event(store: Store, clock: FakeClock) -> None:
    log = signed_log(store, clock, 3)
    with store.transaction() as tx:
        first = tx.list_audit(after_sequence=0, limit=1)[0]
    for statement, params in (
        ("UPDATE kv_audit_tip SET sequence = 1, hash = ? WHERE id = 1", (first.hash,)),
        ("UPDATE kv_audit_tip SET sequence = 4, hash = ? WHERE id = 1", (b"x" * 32,)),
        ("DELETE FROM kv_audit_tip", ()),
        ("DELETE FROM kv_audit_signatures WHERE sequence = 3", ()),
        ("UPDATE kv_audit_signatures SET signature = ? WHERE sequence = 3", (b"s" * 64,)),
        (
            "INSERT INTO kv_audit_events VALUES (9, 1, 'a', 'allowed', 'c', '{}', ?, ?)",
            (b"p" * 32, b"h" * 32),
        ),
    ):
        with pytest.raises(Exception, match="audit"), store.transaction() as tx:
            tx._run(statement, params)  # type: ignore[attr-defined]
    assert log.verify_chain() == 3


def test_an_unsigned_tip_is_refused_not_signed_on_first_use(store: Store, clock: FakeClock) -> None:
    # A log with its signatures stripped looks like one never signed: the start refuses it.
    unsigned = AuditLog(store, clock)
    unsigned.record(action="release", outcome="allowed", caller="spiffe://veil/state", detail={})
    log = AuditLog(store, clock)
    log.attach_signer(fixed_release_signer())
    with pytest.raises(AuditChainError, match="carries no release-key signature"):
        log.verify_chain()
    assert log.signed_tip() is None
