"""Freshness: each instance's commit head and genesis, moved only along its enclave's own links.

A commit head is (sequence, 32-byte hash of the entry at that sequence). Besides it the
keyvault keeps the instance's *genesis*: the hash of its first entry and of its configuration,
registered when the instance is created, so one instance id names one log forever.

Two operations, both against a hostile state host:

* **Statements** (GetCommitHead with an enclave key and challenge): the keyvault signs
  ``wire.head_statement_bytes`` -- the head (sequence 0: no such instance), the genesis, the
  enclave's signing key and the challenge it issued, and a short expiry -- with its release
  key. The enclave needs one to create an instance (it must not exist yet) or to restore one
  (the log must contain the head and the genesis); the challenge is single-use, so a statement
  cannot be kept for later or handed to another enclave boot.
* **Advances** (AdvanceCommitHead): the request carries consecutive ``CommitLink`` s, each
  signed by the enclave (its key taken from the attestation token, never from the request)
  over (instance, genesis, config, base head, new head). Compare and set: one link must start
  at the stored head, the genesis must be the registered one, and the last link's head
  becomes the stored head. A link from sequence 0 registers a new instance (only if the
  keyvault holds none). The same head again is an idempotent success. Anything else --
  a path that does not extend the stored head (a fork, a rollback), another genesis, a bad
  signature -- is refused. The answer is a ``HeadConfirmation`` signed by the release key,
  made to that enclave boot (its signing key), which lets it release the answers it held.
  With it go the *hold keys* of the path's heads (hold_keys.py), which open those answers
  without handing the confirmation back to the enclave (an ECALL per batch).
Once an instance has a lease (leases.py), only its current fencing token moves its head
(``LEASE_LOST`` otherwise), checked in the compare-and-set's own transaction.

Only enclaves the operator trusts may move heads at all: the token must satisfy the operator
enclave policy (:mod:`veil.services.keyvault.enclave_policy`), else
``COMMIT_HEAD_ENCLAVE_NOT_ALLOWED``; with no policy configured every advance is refused. The
write is an atomic compare-and-set in the store, so two replicas cannot both move one head
from the same base. Every advance outcome is audited. Sequences are limited to 1..2^63-1
(signed 64-bit in both databases).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.services.keyvault import leases
from veil.services.keyvault.audit import ACTION_ADVANCE_HEAD, OUTCOME_ALLOWED, DetailValue
from veil.services.keyvault.clock import to_micros
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.enclave_keys import bound_enclave_keys
from veil.services.keyvault.enclave_policy import REASON_ENCLAVE_NOT_ALLOWED
from veil.services.keyvault.errors import HeadRefusedError, InvalidArgumentError, StoreError
from veil.services.keyvault.store import CommitHeadRecord

HASH_SIZE = wire.HASH_SIZE
MAX_SEQUENCE = 2**63 - 1
MAX_LINKS = 1024  # per advance; a host that fell further behind sends several
CHALLENGE_SIZE = 32
ED25519_KEY_SIZE = 32
STATEMENT_TTL_S = 30.0
_CAS_ATTEMPTS = 8


@dataclass(frozen=True)
class CommitHead(CommitHeadRecord):
    """An instance's committed head, its registered genesis, and the enclave key that moved it:
    the stored record, with its wire form."""

    @classmethod
    def from_record(cls, record: CommitHeadRecord) -> CommitHead:
        return cls(**vars(record))

    def proto(self) -> envelope_pb2.CommitHead:
        return envelope_pb2.CommitHead(sequence=self.sequence, hash=self.hash)


class CommitHeads:
    """Reads, states and advances commit heads."""

    def __init__(self, deps: Deps, *, statement_ttl_s: float = STATEMENT_TTL_S) -> None:
        self._deps = deps
        self._ttl_s = statement_ttl_s

    def get(self, instance_id: str) -> CommitHead | None:
        """The instance's head, or None if it was never registered."""
        leases.check_instance_id(instance_id)
        with self._deps.store.transaction() as tx:
            record = tx.get_head(instance_id)
        return None if record is None else CommitHead.from_record(record)

    def statement(
        self, instance_id: str, enclave_signing_public_key: bytes, challenge: bytes
    ) -> envelope_pb2.HeadStatement:
        """The signed head statement for one enclave boot and its challenge (see the module doc)."""
        if len(enclave_signing_public_key) != ED25519_KEY_SIZE:
            raise InvalidArgumentError("enclave_signing_public_key must be 32 bytes (Ed25519)")
        if len(challenge) != CHALLENGE_SIZE:
            raise InvalidArgumentError(f"challenge must be {CHALLENGE_SIZE} bytes")
        head = self.get(instance_id)
        statement = envelope_pb2.HeadStatement(
            instance_id=instance_id,
            challenge=challenge,
            enclave_signing_public_key=enclave_signing_public_key,
            not_after_unix_ms=int((self._deps.clock() + self._ttl_s) * 1000),
        )
        if head is not None:
            statement.head.CopyFrom(head.proto())
            statement.genesis_hash, statement.config_hash = head.genesis_hash, head.config_hash
        statement.signature = self._deps.release_signer.sign(wire.head_statement_bytes(statement))
        return statement

    def confirmation(
        self, head: CommitHead, enclave_signing_public_key: bytes
    ) -> envelope_pb2.HeadConfirmation:
        """The release key's confirmation that the keyvault holds `head`, for the enclave boot whose
        links reached it (an old confirmation replayed into another boot is refused there)."""
        message = wire.head_confirmation_bytes(
            head.instance_id, head.sequence, head.hash, enclave_signing_public_key
        )
        return envelope_pb2.HeadConfirmation(
            instance_id=head.instance_id,
            head=head.proto(),
            signature=self._deps.release_signer.sign(message),
            enclave_signing_public_key=enclave_signing_public_key,
        )

    def advance(
        self,
        instance_id: str,
        links: Sequence[envelope_pb2.CommitLink],
        token: str,
        *,
        caller: str,
        fencing_token: int = 0,
        hold_key_version: int = 0,
    ) -> tuple[CommitHead, bytes]:
        """Move the head along `links` if the attested enclave signed them; see the module rules.
        Once the instance has a lease, only its current `fencing_token` moves it (leases.py).
        `hold_key_version` (audit only): the key version whose hold keys the answer may carry.

        Returns the stored head and the signing key of the enclave that asked (whose links reach
        that head), which its confirmation is made for.
        """
        detail: dict[str, DetailValue] = {"instance_id": instance_id, "links": len(links)}
        try:
            leases.check_instance_id(instance_id)
            _check_path(instance_id, links)
            detail.update(
                {
                    "base_sequence": links[0].base.sequence,
                    "sequence": links[-1].head.sequence,
                    "hash": links[-1].head.hash.hex(),
                    "genesis_hash": links[0].genesis_hash.hex(),
                }
            )
            verified = self._deps.verifier.verify(token)
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
            refusal = self._deps.enclave_policy.refusal(verified.claims)
            if refusal is not None:
                reason = refusal.reason
                if reason == REASON_ENCLAVE_NOT_ALLOWED:
                    reason = "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"
                raise HeadRefusedError(
                    f"enclave may not advance commit heads: {refusal.message}", reason=reason
                )
            for link in links:
                if not wire.verify_commit_link(link, enclave.signing_public_bytes):
                    raise HeadRefusedError(
                        "a link does not verify with the attested enclave signing key",
                        reason="COMMIT_HEAD_BAD_SIGNATURE",
                    )
            if fencing_token:
                detail["fencing_token"] = fencing_token
            if hold_key_version:  # the answer may carry these heads' hold keys (hold_keys.py)
                detail["hold_key_version"] = hold_key_version
            head = self._compare_and_set(links, enclave.signing_public_bytes, caller, detail, fencing_token)
            return head, enclave.signing_public_bytes
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._deps.audit.record_refusal(
                    action=ACTION_ADVANCE_HEAD, caller=caller, detail=detail, refusal=exc
                )
            raise

    def _compare_and_set(
        self,
        links: Sequence[envelope_pb2.CommitLink],
        signing_key: bytes,
        caller: str,
        detail: dict[str, DetailValue],
        fencing_token: int,
    ) -> CommitHead:
        first, last = links[0], links[-1]
        for _ in range(_CAS_ATTEMPTS):
            with self._deps.store.transaction() as tx:
                # The fence commits with the move: a lease taken meanwhile waits for, or refuses, it.
                leases.check(tx, first.instance_id, fencing_token)
                current = tx.get_head(first.instance_id)
                candidate = CommitHeadRecord(
                    instance_id=first.instance_id,
                    sequence=last.head.sequence,
                    hash=last.head.hash,
                    genesis_hash=first.genesis_hash,
                    config_hash=first.config_hash,
                    signing_public_key=signing_key,
                    updated_us=to_micros(self._deps.clock()),
                )
                if current is None:
                    if first.base.sequence != 0:
                        raise HeadRefusedError(
                            "the keyvault holds no head for this instance; the first link must register it",
                            reason="COMMIT_HEAD_UNKNOWN_INSTANCE",
                        )
                    moved = tx.insert_head(candidate)
                else:
                    if (current.sequence, current.hash) == (last.head.sequence, last.head.hash):
                        _check_genesis(current, first)
                        return CommitHead.from_record(current)  # an idempotent repeat
                    _check_extends(current, links)
                    moved = tx.replace_head(
                        candidate, expected_sequence=current.sequence, expected_hash=current.hash
                    )
                if moved:
                    detail["previous_sequence"] = 0 if current is None else current.sequence
                    self._deps.audit.append(
                        tx, action=ACTION_ADVANCE_HEAD, outcome=OUTCOME_ALLOWED, caller=caller, detail=detail
                    )
                    return CommitHead.from_record(candidate)
            # Another replica moved the head between our read and write: re-evaluate.
        raise StoreError("commit head is contended; retry")


def _check_path(instance_id: str, links: Sequence[envelope_pb2.CommitLink]) -> None:
    """The links are well formed and consecutive, for one instance and one genesis."""
    if not 1 <= len(links) <= MAX_LINKS:
        raise InvalidArgumentError(f"links: 1 to {MAX_LINKS} commit links are required")
    first = links[0]
    for index, link in enumerate(links):
        if link.instance_id != instance_id:
            raise InvalidArgumentError("every link must name the request's instance")
        if (link.genesis_hash, link.config_hash) != (first.genesis_hash, first.config_hash):
            raise InvalidArgumentError("every link must carry the same genesis")
        sizes = {len(link.genesis_hash), len(link.config_hash), len(link.base.hash), len(link.head.hash)}
        if sizes != {HASH_SIZE}:
            raise InvalidArgumentError(f"link hashes must be {HASH_SIZE} bytes")
        if not link.base.sequence < link.head.sequence <= MAX_SEQUENCE:
            raise InvalidArgumentError(f"a link moves forward, to a sequence in 1..{MAX_SEQUENCE}")
        if index and link.base != links[index - 1].head:
            raise InvalidArgumentError("links must be consecutive (each starts where the previous ends)")


def _check_genesis(current: CommitHeadRecord, link: envelope_pb2.CommitLink) -> None:
    if (current.genesis_hash, current.config_hash) != (link.genesis_hash, link.config_hash):
        raise HeadRefusedError(
            "the links are for another instance created under this id (its genesis differs)",
            reason="COMMIT_HEAD_FORK",
        )


def _check_extends(current: CommitHeadRecord, links: Sequence[envelope_pb2.CommitLink]) -> None:
    """One link must start at the stored head; otherwise say whether it is a rollback or a fork."""
    _check_genesis(current, links[0])
    stored = envelope_pb2.CommitHead(sequence=current.sequence, hash=current.hash)
    if any(link.base == stored for link in links):
        return
    last = links[-1].head.sequence
    if last < current.sequence:
        raise HeadRefusedError(
            f"rollback: sequence {last} is behind the stored head {current.sequence}",
            reason="COMMIT_HEAD_ROLLBACK",
        )
    raise HeadRefusedError(
        f"fork: no link extends the stored head {current.sequence}", reason="COMMIT_HEAD_FORK"
    )
