"""Freshness: each instance's commit head, advanced only forwards and only by its attested enclave.

A commit head is (sequence, 32-byte hash of the entry at that sequence). The state host
reads it back at recovery; a host that replays an older database shows a sequence behind
the keyvault's head and is caught (rollback protection).

An advance carries an Ed25519 signature by the enclave's signing key over::

    commit_head_message(instance_id, sequence, hash) =
        b"veil/commit-head/v1" || u16be(len(instance_id_utf8)) || instance_id_utf8
        || u64be(sequence) || hash (32 bytes)

and the enclave's attestation token; the signing key is taken from the token's runtime
data (after the report-data binding is re-checked), never from the request. Rules:

* no head yet: any sequence >= 1 is accepted and becomes the head;
* same sequence and same hash: idempotent success (nothing changes);
* same sequence, other hash: refused (``COMMIT_HEAD_FORK``);
* lower sequence: refused (``COMMIT_HEAD_ROLLBACK``);
* higher sequence: accepted, and the signing key is recorded. A restarted enclave has new
  keys; because its token is verified afresh, an advance signed by a newly attested key is
  accepted as long as it moves forward, and the head then names the new key.

Only enclaves the operator trusts may move heads at all: the advancing token must satisfy the
operator enclave policy (:mod:`services.keyvault.enclave_policy`; release-policy grammar with
Veil's debug and TCB gates), else ``COMMIT_HEAD_ENCLAVE_NOT_ALLOWED``; with no policy
configured every advance is refused (``ENCLAVE_POLICY_NOT_CONFIGURED``). The write is an
atomic compare-and-set in the store, so two replicas cannot both move one head from the same
base. Every outcome is audited. Sequences are limited to 1..2^63-1 (signed 64-bit in both
databases).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from services.keyvault.audit import (
    ACTION_ADVANCE_HEAD,
    OUTCOME_ALLOWED,
    OUTCOME_REFUSED,
    AuditLog,
    DetailValue,
    refusal_detail,
)
from services.keyvault.clock import Clock, to_micros
from services.keyvault.enclave_keys import bound_enclave_keys
from services.keyvault.enclave_policy import REASON_ENCLAVE_NOT_ALLOWED, EnclavePolicy
from services.keyvault.errors import HeadRefusedError, InvalidArgumentError, StoreError
from services.keyvault.store import CommitHeadRecord, Store
from services.keyvault.tokens import TokenVerifier

COMMIT_HEAD_LABEL = b"veil/commit-head/v1"
HASH_SIZE = 32
MAX_SEQUENCE = 2**63 - 1
MAX_INSTANCE_ID_BYTES = 256
_CAS_ATTEMPTS = 8


def commit_head_message(instance_id: str, sequence: int, head_hash: bytes) -> bytes:
    """The exact bytes the enclave signs for a commit head."""
    raw = instance_id.encode("utf-8")
    if not 0 < len(raw) <= MAX_INSTANCE_ID_BYTES:
        raise InvalidArgumentError(f"instance_id must be 1..{MAX_INSTANCE_ID_BYTES} bytes of UTF-8")
    if not 0 <= sequence <= 0xFFFFFFFFFFFFFFFF:
        raise InvalidArgumentError("sequence must fit in 64 bits")
    if len(head_hash) != HASH_SIZE:
        raise InvalidArgumentError(f"hash must be {HASH_SIZE} bytes")
    return COMMIT_HEAD_LABEL + struct.pack(">H", len(raw)) + raw + struct.pack(">Q", sequence) + head_hash


@dataclass(frozen=True)
class CommitHead:
    """An instance's committed head and the enclave key that signed it."""

    instance_id: str
    sequence: int
    hash: bytes
    signing_public_key: bytes
    updated_us: int

    @classmethod
    def from_record(cls, record: CommitHeadRecord) -> CommitHead:
        return cls(
            instance_id=record.instance_id,
            sequence=record.sequence,
            hash=record.hash,
            signing_public_key=record.signing_public_key,
            updated_us=record.updated_us,
        )


class CommitHeads:
    """Reads and advances commit heads."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        verifier: TokenVerifier,
        clock: Clock,
        *,
        enclave_policy: EnclavePolicy,
    ) -> None:
        self._store = store
        self._audit = audit
        self._verifier = verifier
        self._clock = clock
        self._enclave_policy = enclave_policy

    def get(self, instance_id: str) -> CommitHead | None:
        """The instance's head, or None if it never advanced."""
        _check_instance_id(instance_id)
        with self._store.transaction() as tx:
            record = tx.get_head(instance_id)
        return None if record is None else CommitHead.from_record(record)

    def advance(
        self,
        instance_id: str,
        sequence: int,
        head_hash: bytes,
        signature: bytes,
        token: str,
        *,
        caller: str,
    ) -> CommitHead:
        """Move the head forward if the attested enclave signed it; see the module rules."""
        detail: dict[str, DetailValue] = {"instance_id": instance_id, "sequence": sequence}
        try:
            message = commit_head_message(instance_id, sequence, head_hash)
            if not 1 <= sequence <= MAX_SEQUENCE:
                raise InvalidArgumentError(f"sequence must be in 1..{MAX_SEQUENCE}")
            detail["hash"] = head_hash.hex()
            verified = self._verifier.verify(token)
            detail.update(
                {
                    "jti": verified.jti,
                    "mrenclave": verified.mrenclave,
                    # What the operator enclave policy judges, so a refusal explains itself.
                    "mrsigner": verified.mrsigner,
                    "debuggable": verified.debuggable,
                    "tcb_status": verified.tcb_status,
                }
            )
            enclave = bound_enclave_keys(verified)
            detail["signing_public_key"] = enclave.signing_public_bytes.hex()
            refusal = self._enclave_policy.refusal(verified.claims)
            if refusal is not None:
                reason = refusal.reason
                if reason == REASON_ENCLAVE_NOT_ALLOWED:
                    reason = "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"
                raise HeadRefusedError(
                    f"enclave may not advance commit heads: {refusal.message}", reason=reason
                )
            try:
                enclave.signing_public_key.verify(signature, message)
            except InvalidSignature:
                raise HeadRefusedError(
                    "signature does not verify with the attested enclave signing key",
                    reason="COMMIT_HEAD_BAD_SIGNATURE",
                ) from None
            candidate = CommitHeadRecord(
                instance_id=instance_id,
                sequence=sequence,
                hash=head_hash,
                signing_public_key=enclave.signing_public_bytes,
                updated_us=to_micros(self._clock()),
            )
            return self._compare_and_set(candidate, caller, detail)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._audit.record(
                    action=ACTION_ADVANCE_HEAD,
                    outcome=OUTCOME_REFUSED,
                    caller=caller,
                    detail={**detail, **refusal_detail(exc)},
                )
            raise

    def _compare_and_set(
        self, candidate: CommitHeadRecord, caller: str, detail: dict[str, DetailValue]
    ) -> CommitHead:
        for _ in range(_CAS_ATTEMPTS):
            with self._store.transaction() as tx:
                current = tx.get_head(candidate.instance_id)
                if current is not None:
                    _check_forward(current, candidate)
                    if current.sequence == candidate.sequence:
                        return CommitHead.from_record(current)  # idempotent repeat
                    moved = tx.replace_head(
                        candidate, expected_sequence=current.sequence, expected_hash=current.hash
                    )
                else:
                    moved = tx.insert_head(candidate)
                if moved:
                    detail["previous_sequence"] = 0 if current is None else current.sequence
                    self._audit.append(
                        tx, action=ACTION_ADVANCE_HEAD, outcome=OUTCOME_ALLOWED, caller=caller, detail=detail
                    )
                    return CommitHead.from_record(candidate)
            # Another replica moved the head between our read and write: re-evaluate.
        raise StoreError("commit head is contended; retry")


def _check_forward(current: CommitHeadRecord, candidate: CommitHeadRecord) -> None:
    if candidate.sequence < current.sequence:
        raise HeadRefusedError(
            f"rollback: sequence {candidate.sequence} is behind the stored head {current.sequence}",
            reason="COMMIT_HEAD_ROLLBACK",
        )
    if candidate.sequence == current.sequence and candidate.hash != current.hash:
        raise HeadRefusedError(
            f"fork: sequence {candidate.sequence} is stored with a different hash",
            reason="COMMIT_HEAD_FORK",
        )


def _check_instance_id(instance_id: str) -> None:
    if not isinstance(instance_id, str) or not 0 < len(instance_id.encode("utf-8")) <= MAX_INSTANCE_ID_BYTES:
        raise InvalidArgumentError(f"instance_id must be 1..{MAX_INSTANCE_ID_BYTES} bytes of UTF-8")
