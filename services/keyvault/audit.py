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

A hash chain alone proves nothing to whoever can write the database: they can delete an event
and recompute every later hash. So each append also signs the new tip with the keyvault's
release key (:mod:`veil.services.keyvault.release_key`; its private half exists outside the
database only, unwrapped under the KEK)::

    tip signing bytes = "veil/audit-tip/v1" || u64(sequence) || hash(32)    (Ed25519)

(a label no other release-key signature starts with). Verification requires the tip to carry
a valid signature and every stored signature to match the chain. A rewrite is then detectable;
what stays possible to a database writer is cutting the log back to an older signed tip, which
a running keyvault catches (it never accepts a tip below one it verified) and anyone holding a
newer published tip catches: :meth:`AuditLog.signed_tip` is what to publish (ListAuditEvents
returns it, and the periodic :class:`AuditVerifier` logs it, as does :meth:`check_published`
take it back). The release key is loaded, and attached, before anything else is audited (its
own creation is the first signed event), so a log whose tip is unsigned is refused, never signed
on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from veil.services.keyvault import page_tokens
from veil.services.keyvault.clock import Clock, to_micros
from veil.services.keyvault.errors import AuditChainError, InvalidArgumentError, KeyvaultError
from veil.services.keyvault.store import GENESIS_HASH, AuditEvent, AuditRecord, Store, StoreTx

_log = logging.getLogger(__name__)

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

TIP_SIGNING_LABEL = b"veil/audit-tip/v1"
#: How often :class:`AuditVerifier` re-verifies the chain by default.
DEFAULT_VERIFY_INTERVAL_S = 300.0

#: Values allowed in an event's detail (floats are excluded: their text form is not canonical).
DetailValue = str | int | bool | None | list[str]


def canonical_json(value: object) -> str:
    """The canonical JSON text used for details and for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def event_hash(previous_hash: bytes, event: AuditEvent) -> bytes:
    """SHA-256(previous hash || canonical event JSON)."""
    body = canonical_json(
        {
            "action": event.action,
            "caller": event.caller,
            "detail_json": event.detail_json,
            "outcome": event.outcome,
            "sequence": event.sequence,
            "time_us": event.time_us,
        }
    )
    return hashlib.sha256(previous_hash + body.encode("ascii")).digest()


def tip_signing_bytes(sequence: int, digest: bytes) -> bytes:
    """What the release key signs for an audit tip: label, sequence and the chain hash there."""
    if len(digest) != len(GENESIS_HASH) or not 0 < sequence < 2**64:
        raise ValueError("an audit tip is a sequence in 1..2^64-1 and a 32-byte hash")
    return TIP_SIGNING_LABEL + sequence.to_bytes(8, "big") + digest


def verify_tip(public_key: bytes, sequence: int, digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the release key's signature of the tip (sequence, digest)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, tip_signing_bytes(sequence, digest))
    except (InvalidSignature, ValueError):
        return False
    return True


class TipSigner(Protocol):
    """The key that signs audit tips (the release signer)."""

    @property
    def public_key(self) -> bytes:
        """The raw Ed25519 public key."""
        ...

    def sign(self, message: bytes) -> bytes:
        """An Ed25519 signature over ``message``."""
        ...


@dataclass(frozen=True)
class SignedTip:
    """A signed audit tip, fit to publish: anyone holding the release public key can check it."""

    sequence: int
    hash: bytes
    signature: bytes
    public_key: bytes

    def as_json(self) -> str:
        """The tip as canonical JSON (hex bytes), as logged for publication."""
        return canonical_json(
            {
                "sequence": self.sequence,
                "hash": self.hash.hex(),
                "signature": self.signature.hex(),
                "release_public_key": self.public_key.hex(),
            }
        )


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
        self._signer: TipSigner | None = None
        # The newest tip this process verified: never accept less, and verify onward from it.
        self._verified = (0, GENESIS_HASH)
        self._verified_lock = threading.Lock()

    @property
    def signer(self) -> TipSigner | None:
        """The tip signer, once :meth:`attach_signer` has run."""
        return self._signer

    def attach_signer(self, signer: TipSigner) -> None:
        """Sign every later tip with ``signer`` (the release key, attached as soon as it is loaded).

        From then on :meth:`verify_chain` wants the tip signed: there is no trust-on-first-use
        signing of an unsigned tip, which would let a database writer strip the signatures,
        rewrite the log and have the next start sign the forgery.
        """
        self._signer = signer

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
        event = AuditEvent(
            sequence=sequence,
            time_us=to_micros(self._clock()),
            action=action,
            outcome=outcome,
            caller=caller,
            detail_json=detail_json,
        )
        digest = event_hash(tip_hash, event)
        signature = b"" if self._signer is None else self._signer.sign(tip_signing_bytes(sequence, digest))
        record = AuditRecord(**vars(event), previous_hash=tip_hash, hash=digest, tip_signature=signature)
        tx.insert_audit(record)
        return record

    def record(
        self, *, action: str, outcome: str, caller: str, detail: Mapping[str, DetailValue]
    ) -> AuditRecord:
        """Append one event in its own transaction (refusals, which have no effect to commit)."""
        with self._store.transaction() as tx:
            return self.append(tx, action=action, outcome=outcome, caller=caller, detail=detail)

    def record_refusal(
        self, *, action: str, caller: str, detail: Mapping[str, DetailValue], refusal: Exception
    ) -> AuditRecord:
        """Record ``action`` as refused: ``detail`` plus the refusal's reason and message
        (:func:`refusal_detail`), the same shape for every kind of refusal."""
        detail = {**detail, **refusal_detail(refusal)}
        return self.record(action=action, outcome=OUTCOME_REFUSED, caller=caller, detail=detail)

    def list_events(self, *, page_size: int = 0, page_token: str = "") -> AuditPage:
        """Events in log order; ``page_size`` 0 means the default, at most ``MAX_PAGE_SIZE``.

        The chain up to the tip is verified first (onward from the last verified tip), and the
        page's events are checked against their neighbours, so an event rewritten in place
        behind the verified tip is refused too (AuditChainError, never a silently altered page).
        """
        if page_size < 0:
            raise InvalidArgumentError("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        self.verify_chain(full=False)
        with self._store.transaction() as tx:
            # The event before the page (its link) and one extra row (whether another page exists).
            rows = tx.list_audit(after_sequence=max(after - 1, 0), limit=size + 2)
        before = rows[0] if after and rows and rows[0].sequence == after else None
        rows = rows[1:] if before is not None else rows
        previous = GENESIS_HASH if after == 0 else (before.hash if before is not None else None)
        if previous is None and rows:
            raise AuditChainError(f"event {after} is missing", sequence=after)
        expected = after + 1
        for row in rows:
            assert previous is not None
            _check_event(row, expected, previous)
            previous, expected = row.hash, expected + 1
        events = tuple(rows[:size])
        token = _encode_page_token(events[-1].sequence) if len(rows) > size else ""
        return AuditPage(events=events, next_page_token=token)

    def signed_tip(self) -> SignedTip | None:
        """The newest signed tip (what to publish), or None before the first signed event."""
        with self._store.transaction() as tx:
            record = tx.latest_signed_audit()
        if record is None or self._signer is None:
            return None
        return SignedTip(
            sequence=record.sequence,
            hash=record.hash,
            signature=record.tip_signature,
            public_key=self._signer.public_key,
        )

    def check_published(self, published: SignedTip) -> None:
        """Check the stored chain against a tip published earlier (the anchor outside the database).

        Catches what the signatures alone cannot: the log cut back to an older signed tip, or
        the whole log replaced, since publication. Raises AuditChainError.
        """
        if self._signer is None or published.public_key != self._signer.public_key:
            raise AuditChainError(
                "the published tip is not signed by this keyvault's release key", sequence=0
            )
        if not verify_tip(published.public_key, published.sequence, published.hash, published.signature):
            raise AuditChainError(
                "the published tip's signature does not verify", sequence=published.sequence
            )
        tip_sequence = self.verify_chain()
        if tip_sequence < published.sequence:
            raise AuditChainError(
                f"the log ends at event {tip_sequence}, before the published tip {published.sequence}",
                sequence=tip_sequence,
            )
        with self._store.transaction() as tx:
            rows = tx.list_audit(after_sequence=published.sequence - 1, limit=1)
        if not rows or rows[0].sequence != published.sequence or rows[0].hash != published.hash:
            raise AuditChainError(
                f"event {published.sequence} differs from the published tip", sequence=published.sequence
            )

    def verify_chain(self, *, full: bool = True, batch: int = 500) -> int:
        """Verify the chain up to the stored tip; returns the tip's sequence.

        ``full`` recomputes from the first event; otherwise from the newest tip this process
        verified (an event rewritten before it changes every later hash, so the link to the
        remembered hash breaks). With a signer attached, the tip must carry its valid signature
        and every signature read must match; a tip below one already verified is refused.
        """
        with self._store.transaction() as tx:
            tip_sequence, tip_hash = tx.audit_tip()
        with self._verified_lock:
            verified = self._verified
        if tip_sequence < verified[0]:
            raise AuditChainError(
                f"the audit log went back from event {verified[0]} to {tip_sequence}", sequence=tip_sequence
            )
        previous, expected_sequence = (GENESIS_HASH, 1) if full else (verified[1], verified[0] + 1)
        tip_signed = False
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
                if row.tip_signature:
                    self._check_signature(row)
                    tip_signed = row.sequence == tip_sequence
                previous, expected_sequence = row.hash, expected_sequence + 1
        if previous != tip_hash:
            raise AuditChainError("the last event does not match the stored tip", sequence=tip_sequence)
        unchanged_tip = (tip_sequence, tip_hash) == verified and not full
        if self._signer is not None and tip_sequence and not tip_signed and not unchanged_tip:
            raise AuditChainError(
                f"the audit tip (event {tip_sequence}) carries no release-key signature",
                sequence=tip_sequence,
            )
        with self._verified_lock:
            if tip_sequence >= self._verified[0]:
                self._verified = (tip_sequence, tip_hash)
        return tip_sequence

    def _check_signature(self, row: AuditRecord) -> None:
        if self._signer is not None and not verify_tip(
            self._signer.public_key, row.sequence, row.hash, row.tip_signature
        ):
            raise AuditChainError(
                f"event {row.sequence}'s tip signature is not the release key's", sequence=row.sequence
            )


class AuditVerifier:
    """Re-verifies the chain every ``interval_s`` in a daemon thread and logs the signed tip.

    A failure is logged at CRITICAL (an alert: the log was rewritten or cut back) and kept in
    :attr:`failure`; ListAuditEvents verifies on its own too.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        interval_s: float = DEFAULT_VERIFY_INTERVAL_S,
        on_failure: Callable[[AuditChainError], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._audit = audit
        self._interval_s = interval_s
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-verifier", daemon=True)
        self.failure: AuditChainError | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> None:
        """One verification round (the thread's body; callable directly)."""
        try:
            self._audit.verify_chain(full=False)
        except AuditChainError as exc:
            self.failure = exc
            _log.critical("audit chain verification failed: %s (event %d)", exc.message, exc.sequence)
            if self._on_failure is not None:
                self._on_failure(exc)
            return
        tip = self._audit.signed_tip()
        if tip is not None:
            _log.info("audit tip verified: %s", tip.as_json())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # a database outage must not end the thread
                _log.exception("audit chain verification could not run")


def _check_event(row: AuditRecord, expected_sequence: int, previous: bytes) -> None:
    if row.sequence != expected_sequence:
        raise AuditChainError(f"event {expected_sequence} is missing", sequence=expected_sequence)
    if row.previous_hash != previous:
        raise AuditChainError(f"event {row.sequence} does not link to its predecessor", sequence=row.sequence)
    if event_hash(previous, row) != row.hash:
        raise AuditChainError(f"event {row.sequence} was altered", sequence=row.sequence)


def page_token_after(sequence: int) -> str:
    """The ListAuditEvents page token whose page starts at event ``sequence + 1``."""
    return _encode_page_token(sequence)


def _encode_page_token(sequence: int) -> str:
    return page_tokens.encode(_PAGE_TOKEN_PREFIX, str(sequence))


def _decode_page_token(token: str) -> int:
    number = page_tokens.decode(_PAGE_TOKEN_PREFIX, token)
    if not token:
        return 0
    if not (number.isascii() and number.isdigit()) or len(number) > 19:
        raise InvalidArgumentError("invalid page_token")
    return int(number)
