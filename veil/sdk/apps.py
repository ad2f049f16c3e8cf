"""Typed helpers for the three apps (vault, token, ballot) over `VeilClient.execute/query`.

Each helper acts as one identity on one instance. Methods return plain values; an enclave
refusal (authorization, app rule) raises `CommandRefused`. Every method that changes state
takes an optional `request_id`: after a `GatewayError` (the command may or may not have run),
calling again with the error's `request_id` resumes the same call, so it runs at most once.
The verified answer of the last call (result, receipt, log sequence) stays in `last` for
callers that want the receipt.

Ballot verifiability: `vote` returns a `VoteReceipt` (option, the voter's random salt, the
commitment the enclave returned and its signed receipt). After close, `verify_vote` fetches
the voter's inclusion proof and checks that the commitment recomputes from (ballot, voter,
option, salt), that it is a leaf of the tally's RFC 6962 Merkle tree, and that the counts
add up to the number of leaves.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from veil.enclave import wire
from veil.enclave.apps import merkle
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2
from veil.sdk.errors import CommandRefused, IntegrityError, ResultLost, VeilClientError
from veil.sdk.identity import Identity
from veil.sdk.sealing import Opened

if TYPE_CHECKING:
    from veil.sdk.client import VeilClient

SALT_BYTES = 32
_ACCOUNT = re.compile(r"^[0-9a-f]{64}\Z")
_MAX_AMOUNT = 2**64 - 1


def _amount(value: int) -> int:
    """An amount the apps accept (positive uint64), refused here rather than by protobuf."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_AMOUNT:
        raise VeilClientError(f"an amount is a whole number from 1 to {_MAX_AMOUNT}, not {value!r}")
    return value


@dataclass(frozen=True)
class BatchResult:
    """One call of a batch (`TokenClient.transfer_many`): its value, or the error the single
    call would have raised; `opened` is the verified answer (result, receipt) when there is one."""

    value: Any = None
    error: VeilClientError | None = None
    opened: Opened | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _AppClient:
    _field = ""

    def __init__(self, client: VeilClient, instance_id: str, identity: Identity) -> None:
        self.client = client
        self.instance_id = instance_id
        self.identity = identity
        self.last: Opened | None = None

    @property
    def account(self) -> str:
        """The account the enclave sees for this identity."""
        return self.identity.account

    def _result(self, opened: Opened, method: str) -> Any:
        self.last = opened
        if opened.result_lost:
            raise ResultLost(self.instance_id, opened.sequence)
        if opened.result.HasField("error"):
            error = opened.result.error
            raise CommandRefused(error.code, error.message, opened.receipt)
        app_result = getattr(opened.result.result, self._field)
        if (
            opened.result.result.WhichOneof("result") != self._field
            or app_result.WhichOneof("method") != method
        ):
            raise IntegrityError(f"the enclave answered a {self._field}.{method} call with another result")
        return getattr(app_result, method)

    def _recipient(self, account: str) -> str:
        """`account`, checked before sealing: on an instance whose accounts are Ed25519 keys
        (signature auth, as its enclave describes it), anything but 64 lowercase hex characters
        names nobody, and what is sent there is lost."""
        if not account:
            raise VeilClientError("the recipient account is empty")
        descriptor = self.client.attest(self.instance_id).descriptor
        signature = (
            descriptor is not None and descriptor.config.auth_scheme == envelope_pb2.AUTH_SCHEME_SIGNATURE
        )
        if signature and not _ACCOUNT.match(account):
            raise VeilClientError(
                f"{account!r} is not an account of {self.instance_id!r}: its accounts are Ed25519 public "
                "keys, 64 lowercase hex characters; nothing was sent"
            )
        return account

    def _call(self, method: str, message: Any) -> apps_pb2.AppCall:
        call = apps_pb2.AppCall()
        getattr(getattr(call, self._field), method).CopyFrom(message)
        return call

    def _execute(self, method: str, message: Any, request_id: str | None) -> Any:
        opened = self.client.execute(
            self.instance_id, self._call(method, message), self.identity, request_id=request_id
        )
        return self._result(opened, method)

    def _execute_many(
        self,
        method: str,
        messages: Sequence[Any],
        request_ids: Sequence[str | None] | None,
        value: Callable[[Any], Any] = lambda result: result,
    ) -> list[BatchResult]:
        """Many calls of one method in one ExecuteBatch (`VeilClient.execute_many`), each judged
        as `_execute` judges its own."""
        calls = [self._call(method, message) for message in messages]
        answers = self.client.execute_many(self.instance_id, calls, self.identity, request_ids=request_ids)
        results = []
        for answer in answers:
            if isinstance(answer, VeilClientError):
                results.append(BatchResult(error=answer))
                continue
            try:
                results.append(BatchResult(value=value(self._result(answer, method)), opened=answer))
            except VeilClientError as refused:
                results.append(BatchResult(error=refused, opened=answer))
        return results

    def _query(self, method: str, message: Any) -> Any:
        opened = self.client.query(self.instance_id, self._call(method, message), self.identity)
        return self._result(opened, method)


@dataclass(frozen=True)
class VaultRecord:
    """A record as read: its content and, for the owner, who it is shared with."""

    data: bytes
    readers: tuple[str, ...]


class VaultClient(_AppClient):
    """Personal-data records owned by their subject."""

    _field = "vault"

    def put(self, record_id: str, data: bytes, *, request_id: str | None = None) -> bool:
        """Create or replace one of this identity's records; True when it was new."""
        result: apps_pb2.VaultPutResult = self._execute(
            "put", apps_pb2.VaultPut(record_id=record_id, data=data), request_id
        )
        return result.created

    def get(self, record_id: str, owner: str | None = None) -> VaultRecord:
        """Read a record this identity owns (default) or was shared by `owner`."""
        message = apps_pb2.VaultGet(
            owner=self._recipient(owner) if owner else self.account, record_id=record_id
        )
        result: apps_pb2.VaultGetResult = self._query("get", message)
        return VaultRecord(result.data, tuple(result.readers))

    def share(self, record_id: str, reader: str, *, request_id: str | None = None) -> None:
        """Let `reader` (an account) read one of this identity's records."""
        message = apps_pb2.VaultShare(record_id=record_id, reader=self._recipient(reader))
        self._execute("share", message, request_id)

    def revoke(self, record_id: str, reader: str, *, request_id: str | None = None) -> None:
        """Take `reader`'s access away."""
        message = apps_pb2.VaultRevoke(record_id=record_id, reader=self._recipient(reader))
        self._execute("revoke", message, request_id)

    def delete(self, record_id: str, *, request_id: str | None = None) -> None:
        """Erase one of this identity's records."""
        self._execute("delete", apps_pb2.VaultDelete(record_id=record_id), request_id)


class TokenClient(_AppClient):
    """Confidential balances."""

    _field = "token"

    def mint(self, to: str, amount: int, *, request_id: str | None = None) -> int:
        """Create tokens for `to` (issuer only); returns the new total supply."""
        result: apps_pb2.TokenAmount = self._execute(
            "mint", apps_pb2.TokenMint(to=self._recipient(to), amount=_amount(amount)), request_id
        )
        return result.amount

    def transfer(self, to: str, amount: int, *, request_id: str | None = None) -> int:
        """Move tokens to `to`; returns this identity's balance afterwards."""
        result: apps_pb2.TokenAmount = self._execute(
            "transfer", apps_pb2.TokenTransfer(to=self._recipient(to), amount=_amount(amount)), request_id
        )
        return result.amount

    def transfer_many(
        self, transfers: Sequence[tuple[str, int]], *, request_ids: Sequence[str | None] | None = None
    ) -> list[BatchResult]:
        """Many transfers (to, amount) in one ExecuteBatch (at most `client.MAX_BATCH`), run in
        order; each result's value is the balance after it, or its error is what `transfer`
        would have raised (a GatewayError's `request_id` resumes that transfer). Every recipient
        and amount is checked before anything is sent."""
        messages = [apps_pb2.TokenTransfer(to=self._recipient(to), amount=_amount(n)) for to, n in transfers]
        return self._execute_many("transfer", messages, request_ids, lambda result: result.amount)

    def balance(self) -> int:
        """This identity's balance."""
        result: apps_pb2.TokenAmount = self._query("balance", apps_pb2.TokenBalance())
        return result.amount

    def total_supply(self) -> int:
        """The total supply."""
        result: apps_pb2.TokenAmount = self._query("total_supply", apps_pb2.TokenTotalSupply())
        return result.amount


@dataclass(frozen=True)
class Tally:
    """A closed ballot's result."""

    counts: tuple[int, ...]
    voters: int
    merkle_root: bytes


@dataclass(frozen=True)
class VoteReceipt:
    """What a voter keeps to check later that their vote was counted (keep the salt secret)."""

    instance_id: str
    ballot_id: str
    voter: str
    option: int
    salt: bytes
    commitment: bytes
    receipt: envelope_pb2.Receipt
    replaced: bool = False  # this vote replaced the voter's earlier one (not kept in to_json)

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "ballot_id": self.ballot_id,
            "voter": self.voter,
            "option": self.option,
            "salt": self.salt.hex(),
            "commitment": self.commitment.hex(),
            "receipt": self.receipt.SerializeToString().hex(),
        }

    def receipt_binds_vote(self) -> bool:
        """Whether the signed receipt is this vote's: a command receipt of this instance whose
        result hash is that of the enclave's answer carrying this commitment (signature not
        checked here: `sealing.verify_receipt` with the enclave's key)."""
        if (
            self.receipt.kind != envelope_pb2.RECEIPT_KIND_COMMAND
            or self.receipt.instance_id != self.instance_id
        ):
            return False
        for replaced in (False, True):  # the answer says whether it replaced an earlier vote
            result = command_pb2.CommandResult()
            result.result.ballot.vote.commitment = self.commitment
            result.result.ballot.vote.replaced = replaced
            if (
                hashlib.sha256(result.SerializeToString(deterministic=True)).digest()
                == self.receipt.result_hash
            ):
                return True
        return False

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> VoteReceipt:
        return cls(
            instance_id=str(document["instance_id"]),
            ballot_id=str(document["ballot_id"]),
            voter=str(document["voter"]),
            option=int(document["option"]),
            salt=bytes.fromhex(document["salt"]),
            commitment=bytes.fromhex(document["commitment"]),
            receipt=envelope_pb2.Receipt.FromString(bytes.fromhex(document["receipt"])),
        )


@dataclass(frozen=True)
class InclusionCheck:
    """A vote verified to be counted under the tally's Merkle root."""

    leaf_index: int
    tree_size: int
    tally: Tally


def _tally(result: apps_pb2.BallotTallyResult) -> Tally:
    return Tally(tuple(result.counts), result.voters, result.merkle_root)


class BallotClient(_AppClient):
    """Secret ballots with voter-checkable tallies."""

    _field = "ballot"

    def create(
        self,
        ballot_id: str,
        question: str,
        options: Sequence[str],
        eligible_voters: Sequence[str] = (),
        *,
        min_votes: int = 0,
        request_id: str | None = None,
    ) -> None:
        """Open a ballot; this identity becomes its creator (empty voters: open to everyone).

        `min_votes` raises the number of votes needed to close above the instance's minimum
        (default 3); it cannot lower it.
        """
        message = apps_pb2.BallotCreate(
            ballot_id=ballot_id,
            question=question,
            options=options,
            eligible_voters=[self._recipient(v) for v in eligible_voters],
            min_votes=min_votes,
        )
        self._execute("create", message, request_id)

    def vote(
        self, ballot_id: str, option: int, *, salt: bytes | None = None, request_id: str | None = None
    ) -> VoteReceipt:
        """Cast (or replace) this identity's vote; returns what is needed to verify it later.

        Retrying with the same `request_id` should pass the same `salt` too: the vote is sealed
        again only when the first sealing provably never ran.
        """
        salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
        result: apps_pb2.BallotVoteResult = self._execute(
            "vote", apps_pb2.BallotVote(ballot_id=ballot_id, option=option, salt=salt), request_id
        )
        expected = wire.vote_commitment(ballot_id, self.account, option, salt)
        if result.commitment != expected:
            raise IntegrityError("the enclave committed to a different vote")
        if self.last is None or self.last.receipt is None:
            raise IntegrityError("the vote was not committed with a receipt")
        return VoteReceipt(
            self.instance_id,
            ballot_id,
            self.account,
            option,
            salt,
            result.commitment,
            self.last.receipt,
            replaced=result.replaced,
        )

    def close(self, ballot_id: str, *, request_id: str | None = None) -> Tally:
        """End voting (creator only); returns the tally."""
        return _tally(self._execute("close", apps_pb2.BallotClose(ballot_id=ballot_id), request_id))

    def tally(self, ballot_id: str) -> Tally:
        """The result of a closed ballot."""
        return _tally(self._query("tally", apps_pb2.BallotTally(ballot_id=ballot_id)))

    def info(self, ballot_id: str) -> apps_pb2.BallotInfoResult:
        """Question, options, creator, whether closed, whether open to all."""
        result: apps_pb2.BallotInfoResult = self._query("info", apps_pb2.BallotInfo(ballot_id=ballot_id))
        return result

    def verify_vote(self, vote: VoteReceipt) -> InclusionCheck:
        """Check, after close, that `vote` is counted; IntegrityError names the failed check."""
        if vote.voter != self.account:
            raise IntegrityError("this vote receipt belongs to another voter")
        if vote.commitment != wire.vote_commitment(vote.ballot_id, vote.voter, vote.option, vote.salt):
            raise IntegrityError("the commitment does not recompute from the option and salt")
        proof: apps_pb2.BallotProofResult = self._query(
            "proof", apps_pb2.BallotProof(ballot_id=vote.ballot_id)
        )
        tally = self.tally(vote.ballot_id)
        if proof.commitment != vote.commitment:
            raise IntegrityError(
                "the counted commitment is not the one returned when voting (vote replaced?)"
            )
        if proof.merkle_root != tally.merkle_root or proof.tree_size != tally.voters:
            raise IntegrityError("the proof is for another tally")
        if not merkle.verify_inclusion(
            vote.commitment, proof.leaf_index, proof.tree_size, list(proof.path), tally.merkle_root
        ):
            raise IntegrityError("the vote is not a leaf of the tally's Merkle tree")
        if sum(tally.counts) != tally.voters:
            raise IntegrityError("the counts do not add up to the number of counted votes")
        return InclusionCheck(proof.leaf_index, proof.tree_size, tally)
