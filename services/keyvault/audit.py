"""Append-only, hash-chained audit log of every attest, release, refusal, rotation and destroy.

Each event is stored with the hash of its predecessor and its own hash::

    hash(n) = SHA-256(hash(n-1) || canonical(n))        hash(0) = 32 zero bytes
    canonical(n) = UTF-8 JSON, keys sorted, separators (",", ":"), ASCII-only, of
        {"action": str, "caller": str, "detail_json": str, "outcome": str,
         "sequence": int, "time_us": int}

``detail_json`` is itself canonical JSON (same rules) of the event's facts (key name,
measurement, reason, ...); it is hashed as the exact stored text, so verification never
depends on re-serialising it. Appends happen inside the caller's store transaction (the
effect and its audit record commit together) and take the store's audit-tip lock, so
concurrent replicas extend one chain instead of forking it. :meth:`AuditLog.verify_chain`
recomputes every hash, checks sequence continuity and that the last event matches the
stored tip (so truncating the tail is caught too).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from veil.services.keyvault.clock import Clock, to_micros
from veil.services.keyvault.errors import AuditChainError, InvalidArgumentError, KeyvaultError
from veil.services.keyvault.store import GENESIS_HASH, AuditRecord, Store, StoreTx

OUTCOME_ALLOWED = "allowed"
OUTCOME_REFUSED = "refused"

ACTION_ATTEST = "attest"
ACTION_RELEASE = "release"
ACTION_CREATE = "create"
ACTION_ROTATE = "rotate"
ACTION_DESTROY = "destroy"
ACTION_ADVANCE_HEAD = "advance_commit_head"
ACTION_ROTATE_SIGNING_KEY = "rotate_signing_key"
ACTION_CREATE_RELEASE_KEY = "create_release_key"

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN_PREFIX = "audit-v1:"  # noqa: S105 - a format tag, not a secret

#: Values allowed in an event's detail (floats are excluded: their text form is not canonical).
DetailValue = str | int | bool | None | list[str]


def canonical_json(value: object) -> str:
    """The canonical JSON text used for details and for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def event_hash(
    previous_hash: bytes,
    *,
    sequence: int,
    time_us: int,
    action: str,
    outcome: str,
    caller: str,
    detail_json: str,
) -> bytes:
    """SHA-256(previous hash || canonical event JSON)."""
    body = canonical_json(
        {
            "action": action,
            "caller": caller,
            "detail_json": detail_json,
            "outcome": outcome,
            "sequence": sequence,
            "time_us": time_us,
        }
    )
    return hashlib.sha256(previous_hash + body.encode("ascii")).digest()


def refusal_detail(exc: BaseException) -> dict[str, DetailValue]:
    """The audit detail of a refusal: the domain reason and message, or INTERNAL for a bug."""
    if isinstance(exc, KeyvaultError):
        return {"reason": exc.reason, "message": exc.message}
    return {"reason": "INTERNAL", "message": type(exc).__name__}


@dataclass(frozen=True)
class AuditPage:
    """One page of events and the token for the next (empty at the end)."""

    events: tuple[AuditRecord, ...]
    next_page_token: str


class AuditLog:
    """Appends to, pages through and verifies the audit chain in a :class:`Store`."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def append(
        self,
        tx: StoreTx,
        *,
        action: str,
        outcome: str,
        caller: str,
        detail: Mapping[str, DetailValue],
    ) -> AuditRecord:
        """Append one event inside ``tx`` (call it last: it takes the audit-tip lock)."""
        if any(isinstance(value, float) for value in detail.values()):
            raise InvalidArgumentError("audit details take no floats")
        detail_json = canonical_json(dict(detail))
        tip_sequence, tip_hash = tx.audit_tip()
        sequence = tip_sequence + 1
        time_us = to_micros(self._clock())
        digest = event_hash(
            tip_hash,
            sequence=sequence,
            time_us=time_us,
            action=action,
            outcome=outcome,
            caller=caller,
            detail_json=detail_json,
        )
        record = AuditRecord(
            sequence=sequence,
            time_us=time_us,
            action=action,
            outcome=outcome,
            caller=caller,
            detail_json=detail_json,
            previous_hash=tip_hash,
            hash=digest,
        )
        tx.insert_audit(record)
        return record

    def record(
        self, *, action: str, outcome: str, caller: str, detail: Mapping[str, DetailValue]
    ) -> AuditRecord:
        """Append one event in its own transaction (refusals, which have no effect to commit)."""
        with self._store.transaction() as tx:
            return self.append(tx, action=action, outcome=outcome, caller=caller, detail=detail)

    def list_events(self, *, page_size: int = 0, page_token: str = "") -> AuditPage:
        """Events in log order; ``page_size`` 0 means the default, at most ``MAX_PAGE_SIZE``."""
        if page_size < 0:
            raise InvalidArgumentError("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        with self._store.transaction() as tx:
            # One extra row tells whether another page exists.
            rows = tx.list_audit(after_sequence=after, limit=size + 1)
        events = tuple(rows[:size])
        token = _encode_page_token(events[-1].sequence) if len(rows) > size else ""
        return AuditPage(events=events, next_page_token=token)

    def verify_chain(self, *, batch: int = 500) -> int:
        """Verify the whole chain up to the stored tip; returns the number of events checked."""
        with self._store.transaction() as tx:
            tip_sequence, tip_hash = tx.audit_tip()
        previous, expected_sequence = GENESIS_HASH, 1
        while expected_sequence <= tip_sequence:
            with self._store.transaction() as tx:
                rows = tx.list_audit(after_sequence=expected_sequence - 1, limit=batch)
            if not rows:
                raise AuditChainError(
                    f"events {expected_sequence}..{tip_sequence} are missing", sequence=expected_sequence
                )
            for row in rows:
                if row.sequence > tip_sequence:
                    break
                _check_event(row, expected_sequence, previous)
                previous, expected_sequence = row.hash, expected_sequence + 1
        if previous != tip_hash:
            raise AuditChainError("the last event does not match the stored tip", sequence=tip_sequence)
        return tip_sequence


def _check_event(row: AuditRecord, expected_sequence: int, previous: bytes) -> None:
    if row.sequence != expected_sequence:
        raise AuditChainError(f"event {expected_sequence} is missing", sequence=expected_sequence)
    if row.previous_hash != previous:
        raise AuditChainError(f"event {row.sequence} does not link to its predecessor", sequence=row.sequence)
    recomputed = event_hash(
        previous,
        sequence=row.sequence,
        time_us=row.time_us,
        action=row.action,
        outcome=row.outcome,
        caller=row.caller,
        detail_json=row.detail_json,
    )
    if recomputed != row.hash:
        raise AuditChainError(f"event {row.sequence} was altered", sequence=row.sequence)


def _encode_page_token(sequence: int) -> str:
    raw = f"{_PAGE_TOKEN_PREFIX}{sequence}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
    except (ValueError, UnicodeError):
        raise InvalidArgumentError("invalid page_token") from None
    number = text.removeprefix(_PAGE_TOKEN_PREFIX)
    if number == text or not number.isdigit() or len(number) > 19:
        raise InvalidArgumentError("invalid page_token")
    return int(number)
