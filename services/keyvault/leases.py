"""Instance ownership: at most one state host serves an instance, fenced by a growing token.

A lease names the state host that owns an instance (``holder``, its stable node name), until
when (``expires``), and a **fencing token** that grows by one with every acquisition and is
never reused (the row is never deleted). It lives in the keyvault's store, so every replica
over one PostgreSQL database sees the same lease.

Listing is bounded: a page holds at most `MAX_PAGE_SIZE` leases (each at most about 230 bytes
with the instance id grammar and `MAX_HOLDER_BYTES`, so a page stays well under gRPC's 4 MiB),
and a caller that wants one instance's lease asks for its id (`MAX_LISTED_IDS` per call), not
the table: rows are never deleted, so the table grows with every instance ever leased.

* **Acquire** (token 0): granted when the instance has no lease, when its lease expired, or
  when the holder asks again for its own (a restarted host); each grant is a new token, so a
  paused earlier incarnation of the same node is fenced off too. A live lease of another holder
  is refused (``LEASE_HELD``, with the holder and the time left).
* **Renew** (the token held): extends the expiry while the token is still the current one,
  even after the expiry passed if nobody acquired meanwhile; otherwise ``LEASE_LOST``.
* **Fence** (:meth:`Leases.check`, inside the transaction of the effect): once an instance has a
  lease, its commit head moves and its instance key is released only for the current token;
  any other is ``LEASE_LOST``. The check and the effect commit together (the lease row is
  locked first: lock order in :mod:`veil.services.keyvault.store`), so an acquisition and a
  stale owner's advance cannot interleave. An instance without a lease (hosts from before
  leases) is not fenced; a host that sends a token for one is refused (``LEASE_UNKNOWN``).

What this is for: a paused, partitioned or half-dead state host that lost its lease can no
longer move the keyvault head, so the answers its enclave holds for a strict instance are
never released (the enclave releases only on the keyvault's confirmation), nor can it obtain
the key again. It is not a defence against a hostile host, which can always acquire a lease
under the state identity: what protects clients from that host is the compare-and-set of the
head along enclave-signed links (heads.py) and the enclave's own checks.
Acquisitions (new tokens) are audited; renewals, which happen every few seconds, are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from veil.services.common.instance_ids import INSTANCE_ID_RULE, is_instance_id
from veil.services.keyvault import page_tokens
from veil.services.keyvault.audit import (
    OUTCOME_ALLOWED,
    AuditLog,
    DetailValue,
)
from veil.services.keyvault.clock import Clock, from_micros, to_micros
from veil.services.keyvault.enclave_policy import INSTANCE_KEY_PREFIX
from veil.services.keyvault.errors import InvalidArgumentError, KeyvaultError, StoreError
from veil.services.keyvault.store import LeaseRecord, Store, StoreTx

ACTION_ACQUIRE_LEASE = "acquire_lease"
MIN_TTL_MS = 1_000
MAX_TTL_MS = 60_000
MAX_HOLDER_BYTES = 128
MAX_PAGE_SIZE = 10_000
MAX_LISTED_IDS = 1_000
_PAGE_TOKEN_PREFIX = "leases-v1:"  # noqa: S105 - a format tag, not a secret
_CAS_ATTEMPTS = 8


class LeaseError(KeyvaultError):
    """The caller does not hold the instance's current lease (reported as FAILED_PRECONDITION)."""

    default_reason = "LEASE_LOST"


@dataclass(frozen=True)
class Lease(LeaseRecord):
    """A stored lease."""

    @classmethod
    def from_record(cls, record: LeaseRecord) -> Lease:
        return cls(**vars(record))

    @property
    def expires_at(self) -> float:
        return from_micros(self.expires_us)


class Leases:
    """Acquires, renews, lists and checks instance leases."""

    def __init__(self, store: Store, audit: AuditLog, clock: Clock) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock

    def acquire(self, instance_id: str, holder: str, ttl_ms: int, token: int, *, caller: str) -> Lease:
        """Acquire (token 0) or renew (the token held) `holder`'s lease; see the module rules."""
        _check(instance_id, holder, ttl_ms)
        try:
            return self._acquire(instance_id, holder, ttl_ms, token, caller=caller)
        except LeaseError as exc:
            if exc.reason == "LEASE_LOST":  # a stale owner woke up (LEASE_HELD is routine polling)
                self._refused(instance_id, holder, exc, caller=caller)
            raise

    def _acquire(self, instance_id: str, holder: str, ttl_ms: int, token: int, *, caller: str) -> Lease:
        for _ in range(_CAS_ATTEMPTS):
            now = to_micros(self._clock())
            with self._store.transaction() as tx:
                current = tx.get_lease(instance_id, lock=True)
                granted = _grant(current, instance_id, holder, token, now)
                lease = LeaseRecord(
                    instance_id=instance_id,
                    holder=holder,
                    token=granted,
                    expires_us=now + ttl_ms * 1000,
                    updated_us=now,
                )
                if not tx.put_lease(lease, expected_token=0 if current is None else current.token):
                    continue  # another replica wrote the row between our read and write
                if current is None or granted != current.token:
                    detail: dict[str, DetailValue] = {
                        "instance_id": instance_id,
                        "holder": holder,
                        "fencing_token": granted,
                        "previous_holder": "" if current is None else current.holder,
                    }
                    self._audit.append(
                        tx, action=ACTION_ACQUIRE_LEASE, outcome=OUTCOME_ALLOWED, caller=caller, detail=detail
                    )
                return Lease.from_record(lease)
        raise StoreError("the lease is contended; retry")

    def _refused(self, instance_id: str, holder: str, exc: Exception, *, caller: str) -> None:
        """Audit a refused renewal: an owner that lost its lease (paused, partitioned) came back."""
        self._audit.record_refusal(
            action=ACTION_ACQUIRE_LEASE,
            caller=caller,
            detail={"instance_id": instance_id, "holder": holder},
            refusal=exc,
        )

    def list(self) -> list[Lease]:
        """Every lease (tests, tools); the service answers by `page`."""
        with self._store.transaction() as tx:
            return [Lease.from_record(record) for record in tx.list_leases()]

    def page(
        self, *, instance_ids: Sequence[str] = (), page_size: int = 0, page_token: str = ""
    ) -> LeasePage:
        """One page of leases in instance id order (`page_size` 0: `MAX_PAGE_SIZE`), or the
        leases of `instance_ids` only (then in one page)."""
        if instance_ids:
            if len(instance_ids) > MAX_LISTED_IDS:
                raise InvalidArgumentError(f"instance_ids: at most {MAX_LISTED_IDS} per call")
            for instance_id in instance_ids:
                check_instance_id(instance_id)
            with self._store.transaction() as tx:
                records = tx.list_leases(instance_ids=sorted(set(instance_ids)))
            return LeasePage(tuple(Lease.from_record(record) for record in records), "")
        if page_size < 0:
            raise InvalidArgumentError("page_size must not be negative")
        size = min(page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
        with self._store.transaction() as tx:
            records = tx.list_leases(after=_decode_page_token(page_token), limit=size + 1)
        leases = tuple(Lease.from_record(record) for record in records[:size])
        token = _encode_page_token(leases[-1].instance_id) if len(records) > size else ""
        return LeasePage(leases, token)


@dataclass(frozen=True)
class LeasePage:
    """Leases in instance id order, and the token of the next page ("" at the end)."""

    leases: tuple[Lease, ...]
    next_page_token: str


def _encode_page_token(instance_id: str) -> str:
    return page_tokens.encode(_PAGE_TOKEN_PREFIX, instance_id)


def _decode_page_token(token: str) -> str:
    """The instance id a page starts after ("" for the first page)."""
    after = page_tokens.decode(_PAGE_TOKEN_PREFIX, token)
    # (Rows stored before the id grammar may hold other ids: any short one continues a listing.)
    if len(after.encode()) > 256:
        raise InvalidArgumentError("invalid page_token")
    return after


def check(tx: StoreTx, instance_id: str, token: int) -> None:
    """The fence: `token` is the instance's current lease (or the instance has none and no token
    was sent). Call inside the transaction that performs the effect, before the head row."""
    current = tx.get_lease(instance_id, lock=True)
    if current is None:
        if token:
            raise LeaseError(
                f"instance {instance_id!r} has no lease; fencing token {token} is not one the keyvault gave",
                reason="LEASE_UNKNOWN",
            )
        return
    if token != current.token:
        raise LeaseError(
            f"instance {instance_id!r} is owned by {current.holder!r} under fencing token "
            f"{current.token}; token {token or 'none'} was superseded: stop serving it"
        )


def instance_of_key(name: str) -> str | None:
    """The instance an instance key belongs to (``instance.<id>``), or None for other keys."""
    return name[len(INSTANCE_KEY_PREFIX) :] if name.startswith(INSTANCE_KEY_PREFIX) else None


def _grant(current: LeaseRecord | None, instance_id: str, holder: str, token: int, now: int) -> int:
    """The token to store for this request, or LeaseError."""
    if token:  # a renewal
        if current is None or current.token != token or current.holder != holder:
            owner = "nobody" if current is None else f"{current.holder!r} (token {current.token})"
            raise LeaseError(f"lease on {instance_id!r} under token {token} was lost; it is held by {owner}")
        return token
    if current is None:
        return 1
    if current.holder != holder and current.expires_us > now:
        left = (current.expires_us - now) / 1e6
        raise LeaseError(
            f"instance {instance_id!r} is owned by {current.holder!r} for {left:.1f}s more (unless renewed)",
            reason="LEASE_HELD",
        )
    return current.token + 1


def check_instance_id(instance_id: str) -> None:
    """The instance id grammar of every service (`veil.services.common.instance_ids`): the
    enclave creates no other id, and a NUL or control character never reaches the store."""
    if not is_instance_id(instance_id):
        raise InvalidArgumentError(INSTANCE_ID_RULE)


def _check(instance_id: str, holder: str, ttl_ms: int) -> None:
    check_instance_id(instance_id)
    if not 0 < len(holder.encode("utf-8")) <= MAX_HOLDER_BYTES or not holder.isprintable():
        raise InvalidArgumentError(f"holder must be 1..{MAX_HOLDER_BYTES} bytes of printable text")
    if not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        raise InvalidArgumentError(f"ttl_ms must be {MIN_TTL_MS}..{MAX_TTL_MS}")
