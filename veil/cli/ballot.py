"""`veil ballot`: secret ballots: create, vote (keeping a receipt), close, tally, verify-receipt."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from veil.cli import output
from veil.cli.common import (
    acting_client,
    acting_identity,
    app_commands,
    app_verb,
    count,
    open_client,
    receipt_json,
    receipt_line,
    recipient,
    report,
    report_receipt,
    request_id_option,
)
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.sdk.apps import VoteReceipt
from veil.sdk.errors import VeilClientError
from veil.sdk.files import write_json
from veil.sdk.sealing import verify_receipt
from veil.verify.bundle import VerifiedAttestation

if TYPE_CHECKING:
    from veil.cli.common import Subcommands
    from veil.sdk.client import VeilClient

#: The receipt keys this client proved by attestation when voting (DATA_DIR/attested-keys.json).
ATTESTED_KEYS_FILE = "attested-keys.json"


def register(commands: Subcommands) -> None:
    ballot = app_commands(commands, "ballot", "secret ballots")
    with app_verb(
        ballot,
        "create",
        ballot_create,
        "open a ballot (you become its creator)",
        'veil ballot create ballots chair --question "Who chairs?" --option alice --option bob '
        "--voter alice --voter bob --voter carol --as clerk",
    ) as open_ballot:
        open_ballot.add_argument("ballot")
        open_ballot.add_argument("--question", required=True)
        open_ballot.add_argument(
            "--option", action="append", required=True, help="a choice (repeat, 2 to 64)"
        )
        open_ballot.add_argument(
            "--voter",
            action="append",
            default=[],
            help="eligible voter: identity or contact name, or 64-hex account (repeat; default: all)",
        )
        open_ballot.add_argument(
            "--min-votes",
            type=count(2**32 - 1),
            default=0,
            help="votes needed to close; raises, never lowers, the instance's minimum (default 3)",
        )
        request_id_option(open_ballot)
    with app_verb(
        ballot,
        "vote",
        ballot_vote,
        "cast or replace your vote; keeps a receipt to verify later",
        "veil ballot vote ballots chair bob --as alice",
    ) as vote:
        vote.add_argument("ballot")
        vote.add_argument("option", help="option index or label")
        request_id_option(vote)
    for verb, handler, text in (
        ("close", ballot_close, "end voting (creator) and print the tally"),
        ("tally", ballot_tally, "print a closed ballot's tally"),
    ):
        with app_verb(ballot, verb, handler, text, f"veil ballot {verb} ballots chair --as clerk") as sub:
            sub.add_argument("ballot")
            if verb == "close":  # changes state (a tally only reads)
                request_id_option(sub)
    with app_verb(
        ballot,
        "verify-receipt",
        ballot_verify_receipt,
        "check that your vote is counted in the tally and its receipt is the enclave's",
        "veil ballot verify-receipt ballots chair --as carol",
    ) as verify:
        verify.add_argument("ballot")
        verify.add_argument("--receipt", help="vote receipt file (default: the one `vote` saved)")


def _vote_path(args: argparse.Namespace, ballot: str, voter: str) -> Path:
    return Path(args.data_dir) / "ballots" / str(args.instance) / f"{ballot}.{voter[:16]}.json"


def _keys_path(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / ATTESTED_KEYS_FILE


def _attested_keys(args: argparse.Namespace, instance_id: str) -> list[dict[str, str]]:
    """The receipt keys this client verified by attestation for `instance_id`, oldest first."""
    try:
        document = json.loads(_keys_path(args).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise VeilClientError(f"cannot read {_keys_path(args)}: {exc}") from None
    entries = document.get(instance_id, []) if isinstance(document, dict) else []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("signing_key"), str)]


def _remember_key(args: argparse.Namespace, instance_id: str, attestation: VerifiedAttestation) -> None:
    """Keep the attested receipt key a vote was sealed under: after the enclave restarts (new
    keys), its receipts still verify under a key this client itself proved by attestation."""
    key = attestation.keys.signing_public_key.hex()
    path = _keys_path(args)
    try:
        document = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        document = {}
    if not isinstance(document, dict):
        document = {}
    entries = document.setdefault(instance_id, [])
    if any(e.get("signing_key") == key for e in entries if isinstance(e, dict)):
        return
    entries.append(
        {
            "signing_key": key,
            "mrenclave": attestation.mrenclave.hex(),
            "attested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    write_json(path, document)


def ballot_create(args: argparse.Namespace) -> int:
    voters = [recipient(args, v) for v in args.voter]
    if len(set(voters)) != len(voters):
        raise VeilClientError("a voter is named twice (two names for one account?)")
    with acting_client(args) as (veil, identity):
        ballot = veil.ballot(args.instance, identity)
        ballot.create(
            args.ballot,
            args.question,
            args.option,
            voters,
            min_votes=args.min_votes,
            request_id=args.request_id,
        )
    document = {"ballot_id": args.ballot, "options": args.option, "voters": voters}
    who = f"{len(voters)} eligible voters" if voters else "open to everyone"
    return report_receipt(args, document, ballot.last, f"ballot {args.ballot!r} is open ({who})")


def _kept_salt(veil: VeilClient, request_id: str | None) -> bytes | None:
    """The secret salt of the vote kept unsettled under `request_id` (the data dir's calls), so
    resuming it seals the very same vote; None for a new vote (a fresh salt)."""
    kept = veil.calls.get(request_id) if request_id else None
    if kept is None:
        return None
    call = apps_pb2.AppCall.FromString(kept.call)
    return call.ballot.vote.salt if call.ballot.HasField("vote") else None


def ballot_vote(args: argparse.Namespace) -> int:
    with acting_client(args) as (veil, identity):
        ballot = veil.ballot(args.instance, identity)
        options = list(ballot.info(args.ballot).options)
        if args.option in options:
            option = options.index(args.option)
        elif args.option.isdigit() and int(args.option) < len(options):
            option = int(args.option)
        else:
            choices = ", ".join(f"{i}: {o}" for i, o in enumerate(options))
            raise VeilClientError(f"no option {args.option!r}; the options are {choices}")
        salt = _kept_salt(veil, args.request_id)
        vote = ballot.vote(args.ballot, option, salt=salt, request_id=args.request_id)
        _remember_key(args, args.instance, veil.attest(args.instance))  # the attestation it was sealed to
    path = _vote_path(args, args.ballot, vote.voter)
    superseded = _save_unless_superseded(path, vote)
    document = {
        "ballot_id": args.ballot,
        "commitment": vote.commitment.hex(),
        "replaced": vote.replaced,
        "superseded": superseded,
        "saved": str(path),
        "receipt": receipt_json(ballot.last),
    }
    if superseded:
        said = (
            f"this is the answer of an earlier vote for {options[option]!r} (request id "
            f"{args.request_id}), which a later vote replaced: it no longer counts; "
            f"{receipt_line(ballot.last)}\nthe receipt of your current vote stays in {path}"
        )
    else:
        said = (
            (
                f"this vote replaced your earlier vote (which no longer counts): now {options[option]!r}; "
                if vote.replaced
                else f"vote cast for {options[option]!r}; "
            )
            + f"commitment {vote.commitment.hex()}; {receipt_line(ballot.last)}\n"
            f"vote receipt saved to {path} (keep it: it proves your vote later)"
        )
    return report(args, document, lambda: print(said))


def _save_unless_superseded(path: Path, vote: VoteReceipt) -> bool:
    """Save `vote`'s receipt (its salt proves the vote later), unless the one saved is of a
    later vote: an earlier vote's answer again (a rerun by request id) must not overwrite the
    only copy of the counted vote's salt. True when it was not saved for that reason."""
    try:
        kept = envelope_pb2.Receipt.FromString(bytes.fromhex(json.loads(path.read_text())["receipt"]))
    except (OSError, ValueError, KeyError, TypeError, DecodeError):
        kept = None  # none yet, or unreadable: this one is saved
    if kept is not None and kept.sequence > vote.receipt.sequence:
        return True
    # Atomic and flushed: it replaces what may be the only copy of a salt (which reveals the vote).
    write_json(path, vote.to_json(), durable=True, mode=0o600)
    return False


def _tally_table(options: list[str], counts: tuple[int, ...]) -> None:
    output.table(["OPTION", "VOTES"], [[o, c] for o, c in zip(options, counts, strict=True)])


def _tally(args: argparse.Namespace, close: bool) -> int:
    with acting_client(args) as (veil, identity):
        ballot = veil.ballot(args.instance, identity)
        tally = ballot.close(args.ballot, request_id=args.request_id) if close else ballot.tally(args.ballot)
        info = ballot.info(args.ballot)
    options = list(info.options)
    document = {
        "ballot_id": args.ballot,
        "question": info.question,
        "counts": dict(zip(options, tally.counts, strict=True)),
        "voters": tally.voters,
        "merkle_root": tally.merkle_root.hex(),
    }

    def human() -> None:
        print(info.question)
        _tally_table(options, tally.counts)
        print(f"{tally.voters} votes counted; Merkle root {tally.merkle_root.hex()}")

    return report(args, document, human)


def ballot_close(args: argparse.Namespace) -> int:
    return _tally(args, close=True)


def ballot_tally(args: argparse.Namespace) -> int:
    return _tally(args, close=False)


def ballot_verify_receipt(args: argparse.Namespace) -> int:
    """Counted (inclusion proof), this vote's (the receipt's result hash) and signed: under the
    enclave key attested now, or under the key of an earlier boot that this client attested
    itself when voting (DATA_DIR/attested-keys.json). Any other receipt is not called valid: the
    command says it could not be verified and exits 1.
    """
    identity = acting_identity(args)
    path = Path(args.receipt) if args.receipt else _vote_path(args, args.ballot, identity.account)
    try:
        vote = VoteReceipt.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
        raise VeilClientError(f"cannot read vote receipt {path}: {exc}") from None
    if vote.instance_id != args.instance or vote.ballot_id != args.ballot:
        raise VeilClientError(
            f"{path} is a receipt for ballot {vote.ballot_id!r} on {vote.instance_id!r}, "
            f"not {args.ballot!r} on {args.instance!r}"
        )
    with open_client(args) as veil:
        ballot = veil.ballot(args.instance, identity)
        signing_key = veil.attest(args.instance).keys.signing_public_key
        check = ballot.verify_vote(vote)
    root = check.tally.merkle_root.hex()
    if not vote.receipt_binds_vote():
        raise VeilClientError(
            f"your vote's commitment is leaf {check.leaf_index} of {check.tree_size} under Merkle root "
            f"{root}, but the receipt in {path} is NOT this vote's (it commits to another answer)"
        )
    current = verify_receipt(vote.receipt, signing_key)
    earlier = None
    if not current:
        earlier = next(
            (
                entry
                for entry in _attested_keys(args, args.instance)
                if verify_receipt(vote.receipt, bytes.fromhex(entry["signing_key"]))
            ),
            None,
        )
    if not current and earlier is None:
        raise VeilClientError(
            f"your vote's commitment is leaf {check.leaf_index} of {check.tree_size} under Merkle root "
            f"{root}, but its receipt could NOT be verified: the attested enclave key does not verify "
            "its signature, nor does any key this client attested earlier (altered, or signed by an "
            "enclave boot this client never attested)"
        )
    document = {
        "ballot_id": vote.ballot_id,
        "counted": True,
        "leaf_index": check.leaf_index,
        "tree_size": check.tree_size,
        "merkle_root": root,
        "vote_receipt_signature": "valid" if earlier is None else "valid under an earlier attested key",
        "vote_receipt_key": signing_key.hex() if earlier is None else earlier["signing_key"],
    }
    if earlier is not None:
        document["vote_receipt_key_attested_at"] = earlier["attested_at"]
    signer = (
        "the attested enclave key"
        if earlier is None
        else f"the key of an earlier boot of the enclave, which this client attested on "
        f"{earlier['attested_at']} (MRENCLAVE {earlier.get('mrenclave', '?')[:16]}…)"
    )

    def human() -> None:
        print(f"your vote is counted: leaf {check.leaf_index} of {check.tree_size} under Merkle root {root}")
        print("checked: the commitment recomputes from your option and salt; the inclusion proof")
        print(f"         verifies against the tally's root; the counts sum to {check.tree_size}; the vote")
        print(f"         receipt's signature verifies under {signer}")

    return report(args, document, human)
