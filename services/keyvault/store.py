"""The keyvault's persistence interface: every piece of state, behind one transactional Protocol.

Keyvault replicas are stateless over the database: keys and their versions (material only
ever KEK-wrapped), token-signing keys and the release-signing key (private halves
KEK-wrapped), used token ids, commit heads, the audit log and idempotency records all live
here. Two implementations pass one
test suite: :mod:`veil.services.keyvault.store_sqlite` (embedded default) and
:mod:`veil.services.keyvault.store_postgres` (production, shared by replicas).

Concurrency contract (what the libraries rely on):

* ``Store.transaction()`` is all-or-nothing: it commits when the block exits normally and
  rolls back when it raises.
* Writers are safe against each other across processes: ``insert_*`` methods that return
  ``bool`` are atomic insert-if-absent (``INSERT ... ON CONFLICT DO NOTHING``),
  ``replace_head`` is an atomic compare-and-set, ``insert_release_key`` sets the one
  release-signing key only if none exists, ``get_key(lock=True)`` holds the key row
  until commit, and ``audit_tip()`` serialises audit appends so two replicas cannot fork
  the hash chain (``SELECT ... FOR UPDATE`` on a head row in PostgreSQL; ``BEGIN
  IMMEDIATE`` in SQLite, which serialises all writers anyway).
* ``claim_request`` makes request ids idempotent: in the transaction that performs the
  effect, it either returns the committed record of an earlier request with the same id or
  reserves the id, so a concurrent duplicate waits for (and then sees) the first result.
* Lock order is fixed -- idempotency record, release key, key row, instance lease, commit
  head, audit tip last -- so transactions never deadlock one another.

All times are integer microseconds since the epoch (see :mod:`veil.services.keyvault.clock`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

#: The hash that precedes the first audit event.
GENESIS_HASH = bytes(32)


@dataclass(frozen=True)
class KeyRecord:
    """A named data key: its policy and lifecycle, never its material."""

    name: str
    policy_json: str
    latest_version: int
    created_us: int
    updated_us: int
    destroyed: bool


@dataclass(frozen=True)
class KeyVersionRecord:
    """One version of a data key, wrapped under the KEK named by ``kek_id``."""

    name: str
    version: int
    kek_id: str
    wrapped: bytes
    created_us: int


@dataclass(frozen=True)
class SigningKeyRecord:
    """A token-signing key: private half KEK-wrapped, public half as a JWK."""

    kid: str
    wrapped_private: bytes
    public_jwk_json: str
    created_us: int
    retired_us: int | None


@dataclass(frozen=True)
class ReleaseKeyRecord:
    """The keyvault's one Ed25519 release-signing key: private half KEK-wrapped."""

    public_key: bytes
    kek_id: str
    wrapped_private: bytes
    created_us: int


@dataclass(frozen=True)
class CommitHeadRecord:
    """An instance's latest committed (sequence, hash), its registered genesis, and the enclave
    key that signed the last link."""

    instance_id: str
    sequence: int
    hash: bytes
    genesis_hash: bytes
    config_hash: bytes
    signing_public_key: bytes
    updated_us: int


@dataclass(frozen=True)
class LeaseRecord:
    """Which state host owns an instance until when, and the fencing token of that ownership
    (one more with every acquisition; the row is never deleted, so a token is never reused)."""

    instance_id: str
    holder: str
    token: int
    expires_us: int
    updated_us: int


@dataclass(frozen=True)
class AuditEvent:
    """What one audit event says: the fields its chain hash covers (``audit.event_hash``)."""

    sequence: int
    time_us: int
    action: str
    outcome: str
    caller: str
    detail_json: str


@dataclass(frozen=True)
class AuditRecord(AuditEvent):
    """One hash-chained audit event as stored, with the release key's signature of the tip it made
    (empty for events appended before the signer was loaded; a later signed tip covers them)."""

    previous_hash: bytes
    hash: bytes
    tip_signature: bytes = b""


@dataclass(frozen=True)
class IdempotencyRecord:
    """The first result of a mutation with a request id."""

    request_id: str
    operation: str
    fingerprint: str
    result_json: str
    created_us: int


class StoreTx(Protocol):
    """The operations available inside one transaction."""

    # -- keys --------------------------------------------------------------------------
    def get_key(self, name: str, *, lock: bool = False) -> KeyRecord | None:
        """One key; ``lock`` holds its row until commit (PostgreSQL ``FOR UPDATE``)."""
        ...

    def list_keys(self) -> list[KeyRecord]:
        """All keys, ordered by name."""
        ...

    def insert_key(self, key: KeyRecord) -> bool:
        """Insert a key; False (and no change) if the name is taken."""
        ...

    def update_key(self, key: KeyRecord) -> None:
        """Overwrite a key's mutable fields (latest version, updated time, destroyed)."""
        ...

    def insert_key_version(self, version: KeyVersionRecord) -> bool:
        """Insert a key version; False if that (name, version) exists."""
        ...

    def get_key_version(self, name: str, version: int) -> KeyVersionRecord | None:
        """One key version's wrapped material."""
        ...

    def delete_key_versions(self, name: str) -> int:
        """Delete every version's wrapped material (crypto-shred); returns the count."""
        ...

    # -- token-signing keys ------------------------------------------------------------
    def insert_signing_key(self, key: SigningKeyRecord) -> None:
        """Add a signing key."""
        ...

    def list_signing_keys(self) -> list[SigningKeyRecord]:
        """All signing keys, oldest first."""
        ...

    def retire_signing_keys(self, *, except_kid: str, retired_us: int) -> int:
        """Mark every active key except ``except_kid`` retired at ``retired_us``."""
        ...

    def delete_signing_keys_retired_before(self, cutoff_us: int) -> int:
        """Forget keys retired before ``cutoff_us`` (no unexpired token can name them)."""
        ...

    # -- the release-signing key --------------------------------------------------------
    def get_release_key(self) -> ReleaseKeyRecord | None:
        """The release-signing key, or None before the first keyvault start created it."""
        ...

    def insert_release_key(self, key: ReleaseKeyRecord) -> bool:
        """Set the release-signing key if none exists (atomic); False (no change) otherwise."""
        ...

    # -- token replay --------------------------------------------------------------------
    def use_jti(self, jti: str, expires_us: int) -> bool:
        """Record a token id as used; False if it was used already."""
        ...

    def purge_jtis(self, now_us: int) -> int:
        """Forget used token ids whose tokens have expired."""
        ...

    # -- commit heads --------------------------------------------------------------------
    def get_head(self, instance_id: str) -> CommitHeadRecord | None:
        """An instance's head, or None if it has none."""
        ...

    def insert_head(self, head: CommitHeadRecord) -> bool:
        """Create an instance's first head; False if one exists."""
        ...

    def replace_head(self, head: CommitHeadRecord, *, expected_sequence: int, expected_hash: bytes) -> bool:
        """Compare-and-set: replace the head only if it still is (expected_sequence, expected_hash)."""
        ...

    # -- instance leases ----------------------------------------------------------------
    def get_lease(self, instance_id: str, *, lock: bool = False) -> LeaseRecord | None:
        """An instance's lease; ``lock`` holds its row until commit (PostgreSQL ``FOR UPDATE``)."""
        ...

    def list_leases(
        self, *, after: str = "", limit: int | None = None, instance_ids: Sequence[str] | None = None
    ) -> list[LeaseRecord]:
        """Leases ordered by instance id: those after ``after``, at most ``limit`` (None: all);
        with ``instance_ids``, only those instances' (``after`` and ``limit`` still apply)."""
        ...

    def put_lease(self, lease: LeaseRecord, *, expected_token: int) -> bool:
        """Compare-and-set: write the lease only if the stored token is ``expected_token`` (0: no
        lease yet, an insert-if-absent); False (no change) otherwise."""
        ...

    # -- audit -------------------------------------------------------------------------
    def audit_tip(self) -> tuple[int, bytes]:
        """The last event's (sequence, hash), locked until commit; (0, GENESIS_HASH) if empty."""
        ...

    def insert_audit(self, event: AuditRecord) -> None:
        """Append an event (its sequence must be tip + 1) and its tip signature, and move the tip."""
        ...

    def insert_audit_signature(self, sequence: int, signature: bytes) -> bool:
        """Sign an existing event's tip after the fact; False if it already has a signature."""
        ...

    def list_audit(self, *, after_sequence: int, limit: int) -> list[AuditRecord]:
        """Events with sequence > ``after_sequence``, in order, at most ``limit`` (with signatures)."""
        ...

    def latest_signed_audit(self) -> AuditRecord | None:
        """The newest event that carries a tip signature, or None."""
        ...

    # -- idempotency ---------------------------------------------------------------------
    def claim_request(
        self, request_id: str, operation: str, fingerprint: str, now_us: int
    ) -> IdempotencyRecord | None:
        """Return the committed record for ``request_id``, or reserve the id and return None."""
        ...

    def complete_request(self, request_id: str, result_json: str) -> None:
        """Store the result of the request reserved by :meth:`claim_request` in this transaction."""
        ...


class Store(Protocol):
    """A database of keyvault state."""

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgres"``."""
        ...

    def transaction(self) -> AbstractContextManager[StoreTx]:
        """A read-write transaction: commit on normal exit, roll back on exception."""
        ...

    def close(self) -> None:
        """Close every connection this store opened."""
        ...
