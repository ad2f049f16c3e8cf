"""ballot: secret ballots with voter-checkable tallies.

Rules: anyone may create a ballot (question, 2-64 options, eligible voters or open to all) and
becomes its creator; each eligible caller votes while it is open, a later vote replacing the
earlier one; only the creator closes it; the tally is readable only after close. No method
ever returns anyone's vote.

Verifiability: every vote returns the voter's commitment
`wire.vote_commitment(ballot_id, voter, option, salt)`, where the salt is the voter's own
random secret, inside an enclave-signed receipt. At close the enclave sorts the final
commitments bytewise, counts the options, and publishes the counts with the RFC 6962 Merkle
root over the sorted commitments (and their number). After close a voter asks for `proof`
and checks, with `enclave.apps.merkle.verify_inclusion`, that their own commitment (which they
recompute from their option and salt) is a leaf under the tally's root, and that the counts
sum to the number of leaves. Commitments hide votes (salted hashes), so publishing the root
reveals nothing. At close each stored vote is reduced to its commitment: option and salt are
erased from the state.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from veil.enclave.v1 import apps_pb2, envelope_pb2

from enclave import wire
from enclave.apps import merkle
from enclave.apps.base import App, CallContext, Handler, check_name, load, save
from enclave.errors import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    EnclaveError,
)

MAX_OPTIONS = 64
MAX_QUESTION_SIZE = 4096
MIN_SALT, MAX_SALT = 16, 64


def _ballot_key(ballot_id: str) -> tuple[str, ...]:
    return ("ballot", ballot_id)


def _vote_key(ballot_id: str, voter: str) -> tuple[str, ...]:
    return ("ballot", ballot_id, "vote", voter)


def _ballot(context: CallContext, ballot_id: str) -> apps_pb2.BallotRecord:
    check_name(ballot_id, "ballot_id")
    record: apps_pb2.BallotRecord | None = load(context.store, _ballot_key(ballot_id), apps_pb2.BallotRecord)
    if record is None:
        raise EnclaveError(NOT_FOUND, "ballot not found")
    return record


def _closed(record: apps_pb2.BallotRecord) -> None:
    if not record.closed:
        raise EnclaveError(FAILED_PRECONDITION, "ballot is still open")


class BallotApp(App):
    """Secret ballots."""

    kind = envelope_pb2.APP_KIND_BALLOT
    field = "ballot"
    read_only = frozenset({"tally", "proof", "info"})

    def methods(self) -> Mapping[str, Handler]:
        return {
            "create": self.create,
            "vote": self.vote,
            "close": self.close,
            "tally": self.tally,
            "proof": self.proof,
            "info": self.info,
        }

    def create(self, context: CallContext, request: apps_pb2.BallotCreate) -> apps_pb2.BallotCreateResult:
        """Open a ballot; the caller is its creator."""
        check_name(request.ballot_id, "ballot_id")
        if context.store.get(_ballot_key(request.ballot_id)) is not None:
            raise EnclaveError(ALREADY_EXISTS, "ballot exists")
        if len(request.question.encode("utf-8")) > MAX_QUESTION_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "question too long")
        if not 2 <= len(request.options) <= MAX_OPTIONS or len(set(request.options)) != len(request.options):
            raise EnclaveError(INVALID_ARGUMENT, f"2 to {MAX_OPTIONS} distinct options")
        for option in request.options:
            check_name(option, "option")
        for voter in request.eligible_voters:
            check_name(voter, "eligible voter")
        record = apps_pb2.BallotRecord(
            question=request.question,
            options=request.options,
            creator=context.caller.account,
            eligible_voters=sorted(set(request.eligible_voters)),
        )
        save(context.store, _ballot_key(request.ballot_id), record)
        return apps_pb2.BallotCreateResult()

    def vote(self, context: CallContext, request: apps_pb2.BallotVote) -> apps_pb2.BallotVoteResult:
        """Cast or replace the caller's vote; returns its commitment."""
        record = _ballot(context, request.ballot_id)
        if record.closed:
            raise EnclaveError(FAILED_PRECONDITION, "ballot is closed")
        voter = context.caller.account
        voters = record.eligible_voters  # sorted at create
        index = bisect.bisect_left(voters, voter)
        if voters and (index == len(voters) or voters[index] != voter):
            raise EnclaveError(PERMISSION_DENIED, "not an eligible voter")
        if request.option >= len(record.options):
            raise EnclaveError(INVALID_ARGUMENT, "no such option")
        if not MIN_SALT <= len(request.salt) <= MAX_SALT:
            raise EnclaveError(INVALID_ARGUMENT, f"salt must be {MIN_SALT} to {MAX_SALT} bytes")
        commitment = wire.vote_commitment(request.ballot_id, voter, request.option, request.salt)
        stored = apps_pb2.BallotStoredVote(option=request.option, salt=request.salt, commitment=commitment)
        save(context.store, _vote_key(request.ballot_id, voter), stored)
        return apps_pb2.BallotVoteResult(commitment=commitment)

    def close(self, context: CallContext, request: apps_pb2.BallotClose) -> apps_pb2.BallotTallyResult:
        """End voting (creator only): count, commit to the sorted commitments, erase the votes."""
        record = _ballot(context, request.ballot_id)
        if context.caller.account != record.creator:
            raise EnclaveError(PERMISSION_DENIED, "only the creator closes a ballot")
        if record.closed:
            raise EnclaveError(FAILED_PRECONDITION, "ballot is closed")
        counts = [0] * len(record.options)
        leaves: list[bytes] = []
        for key, raw in list(context.store.scan(("ballot", request.ballot_id, "vote"))):
            vote = apps_pb2.BallotStoredVote.FromString(raw)
            counts[vote.option] += 1
            leaves.append(vote.commitment)
            save(context.store, key, apps_pb2.BallotStoredVote(commitment=vote.commitment))
        leaves.sort()
        record.closed = True
        record.tally.CopyFrom(
            apps_pb2.BallotTallyResult(counts=counts, voters=len(leaves), merkle_root=merkle.root(leaves))
        )
        record.leaves.extend(leaves)
        save(context.store, _ballot_key(request.ballot_id), record)
        return record.tally

    def tally(self, context: CallContext, request: apps_pb2.BallotTally) -> apps_pb2.BallotTallyResult:
        """The counts and the Merkle root (after close)."""
        record = _ballot(context, request.ballot_id)
        _closed(record)
        return record.tally

    def proof(self, context: CallContext, request: apps_pb2.BallotProof) -> apps_pb2.BallotProofResult:
        """The caller's inclusion proof (after close)."""
        record = _ballot(context, request.ballot_id)
        _closed(record)
        stored: apps_pb2.BallotStoredVote | None = load(
            context.store, _vote_key(request.ballot_id, context.caller.account), apps_pb2.BallotStoredVote
        )
        if stored is None:
            raise EnclaveError(NOT_FOUND, "no vote from this caller")
        leaves = list(record.leaves)
        index = bisect.bisect_left(leaves, stored.commitment)
        return apps_pb2.BallotProofResult(
            commitment=stored.commitment,
            leaf_index=index,
            tree_size=len(leaves),
            path=merkle.inclusion_path(index, leaves),
            merkle_root=record.tally.merkle_root,
        )

    def info(self, context: CallContext, request: apps_pb2.BallotInfo) -> apps_pb2.BallotInfoResult:
        """The question, options, creator and whether voting has ended."""
        record = _ballot(context, request.ballot_id)
        return apps_pb2.BallotInfoResult(
            question=record.question,
            options=record.options,
            creator=record.creator,
            closed=record.closed,
            open_to_all=not record.eligible_voters,
        )
