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
and checks, with `veil.enclave.apps.merkle.verify_inclusion`, that their own commitment (which they
recompute from their option and salt) is a leaf under the tally's root, and that the counts
sum to the number of leaves. Commitments hide votes (salted hashes), so publishing the root
reveals nothing. At close each stored vote is reduced to its commitment: option and salt are
erased from the state.

Anonymity set: `close` needs the ballot's minimum number of votes (the larger of the instance's
`ballot_min_votes`, default 3, and the ballot's `min_votes`). Bounds: at most MAX_VOTERS voters;
keys under ("ballot", id): "eligible"/voter, "vote"/voter, "voter"/i (the distinct voters in
order, so close reads this ballot's votes only; erased at close), "tree"/h (Merkle level h).
"""

from __future__ import annotations

from collections.abc import Mapping

from veil.enclave import wire
from veil.enclave.apps import merkle
from veil.enclave.apps.base import App, CallContext, Handler, check_name, load, save
from veil.enclave.errors import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    EnclaveError,
)
from veil.enclave.v1 import apps_pb2, envelope_pb2

MAX_OPTIONS = 64
MAX_QUESTION_SIZE = 4096
MIN_SALT, MAX_SALT = 16, 64
DEFAULT_MIN_VOTES = 3  # the anonymity set when the instance sets no ballot_min_votes
MAX_VOTERS = 65_536  # bounds close (O(voters)) and the state a ballot can hold


def _key(ballot_id: str, *parts: str) -> tuple[str, ...]:
    return ("ballot", ballot_id, *parts)


def _ballot(context: CallContext, ballot_id: str) -> apps_pb2.BallotRecord:
    check_name(ballot_id, "ballot_id")
    record: apps_pb2.BallotRecord | None = load(context.store, _key(ballot_id), apps_pb2.BallotRecord)
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

    def validate_config(self, config: envelope_pb2.InstanceConfig) -> None:
        """Refuse a minimum no ballot could reach."""
        if config.ballot_min_votes > MAX_VOTERS:
            raise EnclaveError(INVALID_ARGUMENT, f"ballot_min_votes above the {MAX_VOTERS}-voter cap")

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
        if context.store.get(_key(request.ballot_id)) is not None:
            raise EnclaveError(ALREADY_EXISTS, "ballot exists")
        if len(request.question.encode("utf-8")) > MAX_QUESTION_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "question too long")
        if not 2 <= len(request.options) <= MAX_OPTIONS or len(set(request.options)) != len(request.options):
            raise EnclaveError(INVALID_ARGUMENT, f"2 to {MAX_OPTIONS} distinct options")
        for option in request.options:
            check_name(option, "option")
        eligible = sorted(set(request.eligible_voters))
        if len(eligible) > MAX_VOTERS:
            raise EnclaveError(INVALID_ARGUMENT, f"at most {MAX_VOTERS} eligible voters")
        min_votes = max(context.config.ballot_min_votes or DEFAULT_MIN_VOTES, request.min_votes)
        reachable = len(eligible) or MAX_VOTERS
        if min_votes > reachable:  # it could never close
            raise EnclaveError(
                INVALID_ARGUMENT, f"the ballot needs {min_votes} votes to close but only {reachable} may vote"
            )
        for voter in eligible:
            check_name(voter, "eligible voter")
            context.store.put(_key(request.ballot_id, "eligible", voter), b"")
        record = apps_pb2.BallotRecord(
            question=request.question,
            options=request.options,
            creator=context.caller.account,
            open_to_all=not eligible,
            min_votes=min_votes,
        )
        save(context.store, _key(request.ballot_id), record)
        return apps_pb2.BallotCreateResult()

    def vote(self, context: CallContext, request: apps_pb2.BallotVote) -> apps_pb2.BallotVoteResult:
        """Cast or replace the caller's vote; returns its commitment."""
        ballot_id, voter = request.ballot_id, context.caller.account
        record = _ballot(context, ballot_id)
        if record.closed:
            raise EnclaveError(FAILED_PRECONDITION, "ballot is closed")
        if not record.open_to_all and context.store.get(_key(ballot_id, "eligible", voter)) is None:
            raise EnclaveError(PERMISSION_DENIED, "not an eligible voter")
        if not request.HasField("option"):  # see BallotVote.option: every vote the same size
            raise EnclaveError(INVALID_ARGUMENT, "option must be set explicitly, 0 included")
        if request.option >= len(record.options):
            raise EnclaveError(INVALID_ARGUMENT, "no such option")
        if not MIN_SALT <= len(request.salt) <= MAX_SALT:
            raise EnclaveError(INVALID_ARGUMENT, f"salt must be {MIN_SALT} to {MAX_SALT} bytes")
        replaced = context.store.get(_key(ballot_id, "vote", voter)) is not None
        if not replaced:  # a new voter joins the voter list
            if record.voters >= MAX_VOTERS:
                raise EnclaveError(FAILED_PRECONDITION, f"ballot is full: at most {MAX_VOTERS} voters")
            context.store.put(_key(ballot_id, "voter", str(record.voters)), voter.encode("utf-8"))
            record.voters += 1
            save(context.store, _key(ballot_id), record)
        commitment = wire.vote_commitment(ballot_id, voter, request.option, request.salt)
        stored = apps_pb2.BallotStoredVote(option=request.option, salt=request.salt, commitment=commitment)
        save(context.store, _key(ballot_id, "vote", voter), stored)
        return apps_pb2.BallotVoteResult(commitment=commitment, replaced=replaced)

    def close(self, context: CallContext, request: apps_pb2.BallotClose) -> apps_pb2.BallotTallyResult:
        """End voting (creator only): count, commit to the sorted commitments, erase the votes."""
        ballot_id = request.ballot_id
        record = _ballot(context, ballot_id)
        if context.caller.account != record.creator:
            raise EnclaveError(PERMISSION_DENIED, "only the creator closes a ballot")
        if record.closed:
            raise EnclaveError(FAILED_PRECONDITION, "ballot is closed")
        if record.voters < record.min_votes:  # the anonymity set: see the module docstring
            raise EnclaveError(
                FAILED_PRECONDITION, f"a ballot closes only with at least {record.min_votes} votes"
            )
        counts = [0] * len(record.options)
        counted: list[tuple[bytes, str]] = []
        for index in range(record.voters):  # this ballot's voters only, never a store scan
            index_key = _key(ballot_id, "voter", str(index))
            voter = (context.store.get(index_key) or b"").decode("utf-8")
            context.store.delete(index_key)
            vote: apps_pb2.BallotStoredVote = load(
                context.store, _key(ballot_id, "vote", voter), apps_pb2.BallotStoredVote
            )
            counts[vote.option] += 1
            counted.append((vote.commitment, voter))
        counted.sort()
        for leaf_index, (commitment, voter) in enumerate(counted):  # erases option and salt
            save(
                context.store,
                _key(ballot_id, "vote", voter),
                apps_pb2.BallotStoredVote(commitment=commitment, leaf_index=leaf_index),
            )
        tree = merkle.levels([commitment for commitment, _ in counted])
        for height, level in enumerate(tree):
            context.store.put(_key(ballot_id, "tree", str(height)), level)
        record.closed = True
        record.tally.CopyFrom(
            apps_pb2.BallotTallyResult(counts=counts, voters=len(counted), merkle_root=tree[-1])
        )
        save(context.store, _key(ballot_id), record)
        return record.tally

    def tally(self, context: CallContext, request: apps_pb2.BallotTally) -> apps_pb2.BallotTallyResult:
        """The counts and the Merkle root (after close)."""
        record = _ballot(context, request.ballot_id)
        _closed(record)
        return record.tally

    def proof(self, context: CallContext, request: apps_pb2.BallotProof) -> apps_pb2.BallotProofResult:
        """The caller's inclusion proof (after close), one stored node per tree level."""
        record = _ballot(context, request.ballot_id)
        _closed(record)
        stored: apps_pb2.BallotStoredVote | None = load(
            context.store, _key(request.ballot_id, "vote", context.caller.account), apps_pb2.BallotStoredVote
        )
        if stored is None:
            raise EnclaveError(NOT_FOUND, "no vote from this caller")
        size = record.tally.voters
        tree = [
            context.store.get(_key(request.ballot_id, "tree", str(h))) or b""
            for h in range((size - 1).bit_length())
        ]
        return apps_pb2.BallotProofResult(
            commitment=stored.commitment,
            leaf_index=stored.leaf_index,
            tree_size=size,
            path=merkle.audit_path(stored.leaf_index, tree),
            merkle_root=record.tally.merkle_root,
        )

    def info(self, context: CallContext, request: apps_pb2.BallotInfo) -> apps_pb2.BallotInfoResult:
        """The question, options, creator, minimum votes and whether voting has ended."""
        record = _ballot(context, request.ballot_id)
        return apps_pb2.BallotInfoResult(
            question=record.question,
            options=record.options,
            creator=record.creator,
            closed=record.closed,
            open_to_all=record.open_to_all,
            min_votes=record.min_votes,
        )
