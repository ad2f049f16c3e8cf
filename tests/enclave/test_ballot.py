"""The ballot app's bounds, run directly on a Store: anonymity set, voter cap, proofs, determinism.

These call `BallotApp` the way the instance does (each call in its own nested transaction,
rolled back on refusal), so they need no enclave runtime; tests/enclave/test_apps.py drives the
same app through sealed commands.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence

import pytest
from google.protobuf.message import Message

from veil.enclave import wire
from veil.enclave.apps import ballot, merkle
from veil.enclave.apps.base import CallContext
from veil.enclave.auth import Caller
from veil.enclave.errors import EnclaveError
from veil.enclave.store import Key, Store
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2


class CountingStore(Store):
    """A Store that counts reads and refuses whole-store scans."""

    gets = 0

    def get(self, key: Key) -> bytes | None:
        self.gets += 1
        return super().get(key)

    def scan(self, prefix: Key) -> Iterator[tuple[Key, bytes]]:
        raise AssertionError("the ballot app must not scan the store")


class Ballots:
    """One ballot instance's state and app, called as the instance calls an app."""

    def __init__(self, min_votes: int = 0) -> None:
        self.store = CountingStore()
        self.app = ballot.BallotApp()
        self.config = envelope_pb2.InstanceConfig(
            app=envelope_pb2.APP_KIND_BALLOT,
            auth_scheme=envelope_pb2.AUTH_SCHEME_NONE,
            ballot_min_votes=min_votes,
        )

    def call(self, account: str, **method: Message) -> apps_pb2.BallotResult:
        """Run one call; raises EnclaveError (with the state rolled back) when refused."""
        call = apps_pb2.AppCall(ballot=apps_pb2.BallotCall(**method))  # type: ignore[arg-type]
        self.store.begin()
        try:
            result = self.app.execute(CallContext(self.store, Caller(account), self.config), call)
        except EnclaveError:
            self.store.rollback()
            raise
        self.store.commit()
        return result.ballot

    def refused(self, account: str, **method: Message) -> EnclaveError:
        """The refusal of a call that must be refused (and change nothing)."""
        before = self.store.items()
        with pytest.raises(EnclaveError) as refusal:
            self.call(account, **method)
        assert self.store.items() == before
        return refusal.value

    def create(self, voters: Sequence[str] = (), min_votes: int = 0, ballot_id: str = "q") -> None:
        self.call(
            "chair",
            create=apps_pb2.BallotCreate(
                ballot_id=ballot_id,
                question="?",
                options=["a", "b", "c"],
                eligible_voters=voters,
                min_votes=min_votes,
            ),
        )

    def vote(
        self, voter: str, option: int, salt: bytes | None = None, ballot_id: str = "q"
    ) -> apps_pb2.BallotVoteResult:
        salt = salt or hashlib.sha256(f"{voter}/{option}".encode()).digest()
        return self.call(voter, vote=apps_pb2.BallotVote(ballot_id=ballot_id, option=option, salt=salt)).vote

    def close(self, ballot_id: str = "q") -> apps_pb2.BallotTallyResult:
        return self.call("chair", close=apps_pb2.BallotClose(ballot_id=ballot_id)).close

    def info(self, ballot_id: str = "q") -> apps_pb2.BallotInfoResult:
        return self.call("chair", info=apps_pb2.BallotInfo(ballot_id=ballot_id)).info

    def proof(self, voter: str, ballot_id: str = "q") -> apps_pb2.BallotProofResult:
        return self.call(voter, proof=apps_pb2.BallotProof(ballot_id=ballot_id)).proof


def _code(error: EnclaveError) -> str:
    return error_pb2.EcallErrorCode.Name(error.code).removeprefix("ECALL_ERROR_CODE_")


def _reference_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 section 2.1, transcribed: MTH(D[n]) = node(MTH(D[:k]), MTH(D[k:]))."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return merkle.leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _reference_root(leaves[:k]) + _reference_root(leaves[k:])).digest()


def _reference_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 6962 section 2.1.1, transcribed: PATH(m, D[n])."""
    if len(leaves) <= 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if index < k:
        return [*_reference_path(index, leaves[:k]), _reference_root(leaves[k:])]
    return [*_reference_path(index - k, leaves[k:]), _reference_root(leaves[:k])]


# --- the anonymity set ---------------------------------------------------------------------------


def test_close_is_refused_below_the_default_minimum_of_three() -> None:
    ballots = Ballots()
    ballots.create()
    assert ballots.info().min_votes == ballot.DEFAULT_MIN_VOTES == 3
    ballots.vote("ann", 0)
    ballots.vote("ben", 1)
    ballots.vote("ann", 2)  # a replaced vote is still one voter
    refusal = ballots.refused("chair", close=apps_pb2.BallotClose(ballot_id="q"))
    assert _code(refusal) == "FAILED_PRECONDITION"
    assert "at least 3 votes" in refusal.message
    ballots.vote("cat", 1)
    assert list(ballots.close().counts) == [0, 2, 1]


def test_the_instance_floor_applies_and_a_ballot_can_only_raise_it() -> None:
    ballots = Ballots(min_votes=5)
    ballots.create(min_votes=2, ballot_id="low")  # cannot lower the floor
    ballots.create(min_votes=7, ballot_id="high")
    assert ballots.info("low").min_votes == 5
    assert ballots.info("high").min_votes == 7
    for index in range(5):
        ballots.vote(f"v{index}", index % 3, ballot_id="low")
        ballots.vote(f"v{index}", index % 3, ballot_id="high")
    refusal = ballots.refused("chair", close=apps_pb2.BallotClose(ballot_id="high"))
    assert (_code(refusal), "at least 7 votes" in refusal.message) == ("FAILED_PRECONDITION", True)
    assert ballots.close("low").voters == 5
    for index in range(5, 7):
        ballots.vote(f"v{index}", 0, ballot_id="high")
    assert ballots.close("high").voters == 7


def test_an_instance_floor_of_one_closes_a_single_vote() -> None:
    ballots = Ballots(min_votes=1)
    ballots.create()
    assert ballots.info().min_votes == 1
    ballots.vote("ann", 1)
    assert list(ballots.close().counts) == [0, 1, 0]


def test_create_is_refused_when_the_minimum_is_out_of_reach() -> None:
    ballots = Ballots()
    refusal = ballots.refused(
        "chair",
        create=apps_pb2.BallotCreate(
            ballot_id="q", question="?", options=["a", "b"], eligible_voters=["x", "y"]
        ),
    )
    assert _code(refusal) == "INVALID_ARGUMENT"
    assert "needs 3 votes" in refusal.message
    assert "only 2 may vote" in refusal.message
    raised = apps_pb2.BallotCreate(
        ballot_id="q", question="?", options=["a", "b"], eligible_voters=["x", "y", "z"], min_votes=4
    )
    assert _code(ballots.refused("chair", create=raised)) == "INVALID_ARGUMENT"
    beyond_cap = apps_pb2.BallotCreate(
        ballot_id="q", question="?", options=["a", "b"], min_votes=ballot.MAX_VOTERS + 1
    )
    assert _code(ballots.refused("chair", create=beyond_cap)) == "INVALID_ARGUMENT"
    ballots.create(["x", "y", "z", "x"])  # duplicates count once; three distinct voters reach three
    assert not ballots.info().open_to_all
    with pytest.raises(EnclaveError, match="cap"):
        ballots.app.validate_config(envelope_pb2.InstanceConfig(ballot_min_votes=ballot.MAX_VOTERS + 1))
    ballots.app.validate_config(envelope_pb2.InstanceConfig(ballot_min_votes=ballot.MAX_VOTERS))


# --- bounds -----------------------------------------------------------------------------------------


def test_the_voter_cap_refuses_new_voters_but_not_replacements(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ballot, "MAX_VOTERS", 4)
    ballots = Ballots()
    too_many = apps_pb2.BallotCreate(
        ballot_id="q", question="?", options=["a", "b"], eligible_voters=list("abcde")
    )
    assert "at most 4 eligible voters" in ballots.refused("chair", create=too_many).message
    ballots.create()
    for voter in "abcd":
        assert not ballots.vote(voter, 0).replaced
    refusal = ballots.refused("e", vote=apps_pb2.BallotVote(ballot_id="q", option=0, salt=b"s" * 16))
    assert (_code(refusal), refusal.message) == ("FAILED_PRECONDITION", "ballot is full: at most 4 voters")
    assert ballots.vote("a", 1).replaced
    assert list(ballots.close().counts) == [3, 1, 0]


def test_close_reads_only_this_ballots_votes_and_a_proof_one_node_per_level() -> None:
    ballots = Ballots()
    ballots.create(ballot_id="big")
    for index in range(500):
        ballots.vote(f"v{index}", index % 3, ballot_id="big")
    ballots.create(ballot_id="small")
    for voter in ("ann", "ben", "cat"):
        ballots.vote(voter, 0, ballot_id="small")
    ballots.store.gets = 0
    ballots.close("small")  # the store refuses scans; reads grow with this ballot's 3 votes only
    assert ballots.store.gets <= 6 * 3 + 6  # a few per vote of this ballot; none of the other's 500
    ballots.close("big")
    ballots.store.gets = 0
    proof = ballots.proof("v123", ballot_id="big")
    assert ballots.store.gets <= 2 + (500 - 1).bit_length()  # record, vote, one level each
    tally = ballots.call("v1", tally=apps_pb2.BallotTally(ballot_id="big")).tally
    assert merkle.verify_inclusion(
        proof.commitment, proof.leaf_index, proof.tree_size, list(proof.path), tally.merkle_root
    )


# --- proofs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [*range(1, 41), 63, 64, 65, 127, 300])
def test_every_voters_proof_verifies_under_the_tally_root(size: int) -> None:
    ballots = Ballots(min_votes=1)
    ballots.create()
    salts = {f"voter-{i}": secrets.token_bytes(16 + i % 49) for i in range(size)}
    receipts = {
        voter: ballots.vote(voter, i % 3, salt).commitment for i, (voter, salt) in enumerate(salts.items())
    }
    tally = ballots.close()
    leaves = sorted(receipts.values())
    assert tally.voters == size == sum(tally.counts)
    assert tally.merkle_root == _reference_root(leaves)
    for voter, commitment in receipts.items():
        proof = ballots.proof(voter)
        assert (proof.commitment, proof.tree_size, proof.merkle_root) == (commitment, size, tally.merkle_root)
        assert proof.leaf_index == leaves.index(commitment)
        assert list(proof.path) == _reference_path(proof.leaf_index, leaves)
        assert merkle.verify_inclusion(
            commitment, proof.leaf_index, size, list(proof.path), tally.merkle_root
        )
        if size > 1:  # the same path proves nothing for another position
            wrong = (proof.leaf_index + 1) % size
            assert not merkle.verify_inclusion(commitment, wrong, size, list(proof.path), tally.merkle_root)


@pytest.mark.parametrize("size", range(0, 130))
def test_stored_levels_give_the_rfc_6962_root_and_paths(size: int) -> None:
    leaves = [hashlib.sha256(bytes([i % 256, i // 256])).digest() for i in range(size)]
    assert merkle.root(leaves) == _reference_root(leaves)
    levels = merkle.levels(leaves)
    for index in range(size):
        assert (
            merkle.inclusion_path(index, leaves)
            == merkle.audit_path(index, levels)
            == _reference_path(index, leaves)
        )


# --- contract: erasure, determinism -----------------------------------------------------------------


def _run(order: Sequence[tuple[str, int]]) -> Ballots:
    ballots = Ballots()
    ballots.create(["ann", "ben", "cat", "dan"])
    for voter, option in order:
        ballots.vote(voter, option)
    ballots.close()
    return ballots


def test_replaying_the_same_calls_gives_byte_identical_state() -> None:
    calls = [("ann", 0), ("ben", 1), ("ann", 2), ("cat", 1), ("dan", 0), ("ben", 0)]
    assert _run(calls).store.items() == _run(calls).store.items()
    # The closed state depends only on each voter's final vote (ann 2, ben 0, cat 1, dan 0), not
    # on the order voters came in or on replaced votes: leaves are sorted, the voter list erased.
    other = [("dan", 1), ("cat", 0), ("dan", 0), ("ben", 0), ("cat", 1), ("ann", 2)]
    assert _run(other).store.items() == _run(calls).store.items()
    assert _run([*calls, ("dan", 1)]).store.items() != _run(calls).store.items()


def test_close_erases_options_salts_and_the_voter_list() -> None:
    ballots = Ballots()
    ballots.create()
    salts = [secrets.token_bytes(32) for _ in range(3)]
    for index, salt in enumerate(salts):
        ballots.vote(f"v{index}", 1, salt)
    ballots.close()
    items = ballots.store.items()
    assert not any(salt in value for salt in salts for _, value in items)
    assert not [key for key, _ in items if key[2:3] == ("voter",)]
    for key, value in items:
        if key[2:3] == ("vote",):
            stored = apps_pb2.BallotStoredVote.FromString(value)
            assert (stored.option, stored.salt) == (0, b"")
            assert stored.commitment == wire.vote_commitment("q", key[3], 1, salts[int(key[3][1:])])
