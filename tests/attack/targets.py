"""The decoders under attack, each as "make an input" plus "check the verdict".

A check runs one input and returns a short label of what happened (for the fuzz runner's
counts); it raises AssertionError, with the input's story, when the verdict breaks a rule:

* quote: only `QuoteError` subclasses, never another exception; a mutated quote is accepted
  only if it says exactly what its parent said and the signed and hash-bound bytes are intact;
* ECALL: every frame gets a decodable EcallReply; a refusal is a known code (never INTERNAL)
  and changes nothing; a success may change state only for CreateInstance or Restore (an
  authentic older log: freshness is the keyvault's job);
* sealed command: a bad command in a batch between two good ones is refused alone (the good
  ones are accepted, in sequence, with verifying receipts), and the instance state changes
  only in the good callers' keys (and, for the ballot, its voter list), unless the bad command
  was in fact a valid one.
"""

from __future__ import annotations

import random
import secrets
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.message import DecodeError, Message

from tests.attack.enclave_world import INSTANCES, World, good_call
from tests.attack.mutations import (
    HOSTILE_STRINGS,
    HOSTILE_TOKENS,
    big_bytes,
    mutate,
    mutate_message,
    random_bytes,
    random_message,
    random_string,
)
from tests.enclave.support import Client
from veil.enclave import commands, crypto, wire
from veil.enclave.dispatcher import ecall_table
from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import apps_pb2, command_pb2, ecall_pb2, envelope_pb2, error_pb2
from veil.sdk.sealing import seal_plaintext
from veil.services.state.enclave_host import EnclaveCallError
from veil.verify import QuoteError, VerifiedQuote, parse_quote, verify_quote
from veil.verify.collateral import Collateral
from veil.verify.roots import intel_root_public_key, load_root_pem

REPO_ROOT = Path(__file__).resolve().parents[2]
SGX_QUOTES = REPO_ROOT.parent / "shared" / "testdata" / "sgx-quotes"
REAL_QUOTES = (
    "dcap-qvl_sgx_quote.bin",
    "mobilecoin_hw_quote.dat",
    "azure-sdk_sgx_quote.bin",
    "occlum-sgx-quote_quote.raw",
)
COLLATERAL_A = "dcap-qvl_sgx_quote_collateral.json"
#: Inside every real quote's PCK chain validity and quote A's collateral window.
VECTOR_TIME = datetime(2025, 7, 1, tzinfo=UTC)

ECALL_OK_CODES = frozenset(error_pb2.EcallErrorCode.values()) - {
    error_pb2.ECALL_ERROR_CODE_UNSPECIFIED,
    error_pb2.ECALL_ERROR_CODE_INTERNAL,
}
#: ECALLs whose success may legitimately change the enclave (see the module docstring).
ECALL_MAY_CHANGE = frozenset({"CreateInstance", "Restore", "ConfirmHead"})


# --- quotes ------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class QuoteCase:
    """A valid quote, the root and time it verifies under, and what it says."""

    name: str
    raw: bytes
    root: ec.EllipticCurvePublicKey
    now: datetime
    collateral: Collateral | None
    verdict: dict[str, object]
    bound_end: int  # where the certification data (type, size, PEM chain) starts

    def bound(self, data: bytes) -> bytes:
        """The bytes a signature or hash binding covers: all but the two lengths and the chain.

        The chain is checked by parsing and signatures, not byte for byte: trailing NULs
        (tolerated for C writers) and lengths adjusted to match may differ harmlessly.
        """
        return data[:432] + data[436 : self.bound_end]

    def __repr__(self) -> str:  # hypothesis prints fixtures of failing examples: keep it short
        return f"QuoteCase({self.name})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's pretty printer
        printer.text(repr(self))

    def verify(self, data: bytes) -> VerifiedQuote:
        return verify_quote(data, root_public_key=self.root, collateral=self.collateral, now=self.now)


def _bound_end(raw: bytes) -> int:
    """Where the certification data starts (after the QE auth data and its 2-byte size)."""
    return 1014 + int(struct.unpack_from("<H", raw, 1012)[0])


def quote_corpus(pki_dir: Path, sim_quote: bytes) -> list[QuoteCase]:
    """The four real Intel quotes (A also with its collateral) and one sim quote under the dev root."""
    missing = [name for name in (*REAL_QUOTES, COLLATERAL_A) if not (SGX_QUOTES / name).is_file()]
    assert not missing, f"shared SGX test vectors missing under {SGX_QUOTES}: {missing}"
    intel = intel_root_public_key()
    collateral = Collateral.from_json((SGX_QUOTES / COLLATERAL_A).read_bytes())
    sources: list[tuple[str, bytes, ec.EllipticCurvePublicKey, datetime, Collateral | None]] = [
        (name, (SGX_QUOTES / name).read_bytes(), intel, VECTOR_TIME, None) for name in REAL_QUOTES
    ]
    sources.append(("A+collateral", sources[0][1], intel, VECTOR_TIME, collateral))
    sources.append(("sim", sim_quote, load_root_pem(pki_dir / "sgx-root.pem"), datetime.now(UTC), None))
    cases = []
    for name, raw, root, now, coll in sources:
        verdict = verify_quote(raw, root_public_key=root, collateral=coll, now=now)
        cases.append(QuoteCase(name, raw, root, now, coll, _facts(verdict), _bound_end(parse_quote(raw).raw)))
    return cases


def _facts(verdict: VerifiedQuote) -> dict[str, object]:
    facts = verdict.to_json_dict()
    facts["tcb_status"] = verdict.tcb_status
    return facts


def fix_lengths(data: bytes) -> bytes:
    """Make the length fields agree with the bytes, so a mutation reaches the deeper parsers."""
    if len(data) < 436:
        return data
    data = data[:432] + struct.pack("<I", len(data) - 436) + data[436:]
    if len(data) < 1014:
        return data
    auth_size = struct.unpack_from("<H", data, 1012)[0]
    size_at = 1014 + auth_size + 2
    if len(data) < size_at + 4:
        return data
    return data[:size_at] + struct.pack("<I", len(data) - size_at - 4) + data[size_at + 4 :]


def quote_input(rng: random.Random, corpus: Sequence[QuoteCase]) -> tuple[QuoteCase, bytes]:
    """A parent quote and a random, mutated or spliced variant of it."""
    parent = rng.choice(corpus)
    donors = [case.raw for case in corpus]
    kind = rng.randrange(5)
    if kind == 0:
        data = random_bytes(rng, 6000)
    elif kind == 1:  # a real header, then noise: past the first checks
        data = parent.raw[: rng.randrange(48, 440)] + random_bytes(rng, 5000)
    else:
        data = mutate(rng, parent.raw, donors)
        if kind >= 3:
            data = fix_lengths(data)
    return parent, data


def check_quote(parent: QuoteCase, data: bytes) -> str:
    """Verify `data` under `parent`'s root and time: a QuoteError, or the parent's own verdict."""
    try:
        verdict = parent.verify(data)
    except QuoteError as refusal:
        refused: QuoteError | None = refusal  # anything else is not caught: it is the failure
    else:
        refused = None
    if refused is not None:
        assert refused.reason, f"{type(refused).__name__} without a reason"
        return type(refused).__name__
    if data == parent.raw:
        return "accepted-unchanged"
    assert parent.bound(data) == parent.bound(parent.raw), (
        f"mutated {parent.name} quote accepted with changed signed or hash-bound bytes"
    )
    assert _facts(verdict) == parent.verdict, f"mutated {parent.name} quote accepted with other facts"
    return "accepted-same-facts"


# --- ECALL frames ------------------------------------------------------------------------------


def ecall_input(rng: random.Random, world: World, method: str | None = None) -> bytes:
    """A random, mutated or garbage serialized EcallFrame (for `method`, or any frame at all)."""
    chosen = method or rng.choice(sorted(world.seeds))
    seed = rng.choice(world.seeds[chosen])
    request_type = ecall_table(world.enclave)[chosen][0]
    kind = rng.randrange(2, 6) if method else rng.randrange(7)
    if kind == 0:
        return random_bytes(rng)
    if kind == 1:
        frame = ecall_pb2.EcallFrame(method=random_string(rng), payload=random_bytes(rng))
    elif kind == 2:
        frame = ecall_pb2.EcallFrame(method=chosen, payload=random_bytes(rng))
    elif kind == 3:
        payload = random_message(rng, request_type.DESCRIPTOR).SerializeToString()
        frame = ecall_pb2.EcallFrame(method=chosen, payload=payload)
    elif kind == 4:
        donors = [s for ss in world.seeds.values() for s in ss]
        frame = ecall_pb2.EcallFrame(method=chosen, payload=mutate(rng, seed, donors))
    else:
        mutated = mutate_message(rng, request_type.FromString(seed))
        frame = ecall_pb2.EcallFrame(method=chosen, payload=mutated.SerializeToString())
    raw = frame.SerializeToString()
    return mutate(rng, raw) if kind == 6 else raw


def _method_of(frame: bytes) -> str | None:
    try:
        return ecall_pb2.EcallFrame.FromString(frame).method
    except DecodeError:
        return None


def check_ecall(world: World, frame: bytes) -> tuple[str, bool]:
    """Send one frame through the dispatcher; returns (label, whether the enclave changed)."""
    before = world.digest()
    raw = world.dispatcher.handle(frame)
    reply = ecall_pb2.EcallReply.FromString(raw)  # a DecodeError here is a failure too
    method = _method_of(frame)
    known = method if method in world.seeds else "?"  # a label, not the attacker's string
    after = world.digest()
    if reply.HasField("error"):
        name = error_pb2.EcallErrorCode.Name(reply.error.code)
        assert reply.error.code in ECALL_OK_CODES, f"{method}: refused with {name}: {reply.error.message}"
        assert reply.error.message, f"{method}: {name} without a message"
        assert not reply.payload, f"{method}: a refusal carried a payload"
        assert after == before, f"{method}: refused with {name} but the enclave changed"
        return f"{known}:{name.removeprefix('ECALL_ERROR_CODE_')}", False
    assert method in world.seeds, f"an undecodable or unknown frame succeeded: {method}"
    assert method is not None
    response = RESPONSE_TYPES[method].FromString(reply.payload)
    if isinstance(response, ecall_pb2.ExecuteBatchResponse):
        assert not response.entries, "a fuzzed batch executed a command"
    if after != before:
        assert method in ECALL_MAY_CHANGE, f"{method} succeeded and changed the enclave"
        if method == "Restore":
            head = ecall_pb2.RestoreResponse.FromString(reply.payload).head
            request = ecall_pb2.RestoreRequest.FromString(ecall_pb2.EcallFrame.FromString(frame).payload)
            history = {wire.entry_hash(e) for e in world.harness.log.get(request.instance_id, [])}
            assert head.hash in history, "Restore reached a head that is not in the instance's history"
    return f"{method}:OK", after != before


RESPONSE_TYPES: dict[str, type[Message]] = {
    "Initialize": ecall_pb2.InitializeResponse,
    "GetQuote": ecall_pb2.GetQuoteResponse,
    "IssueChallenge": ecall_pb2.IssueChallengeResponse,
    "ProvisionKey": ecall_pb2.ProvisionKeyResponse,
    "CreateInstance": ecall_pb2.CreateInstanceResponse,
    "ExecuteBatch": ecall_pb2.ExecuteBatchResponse,
    "Query": ecall_pb2.QueryResponse,
    "Snapshot": ecall_pb2.SnapshotResponse,
    "Restore": ecall_pb2.RestoreResponse,
    "ConfirmHead": ecall_pb2.ConfirmHeadResponse,
    "Seal": ecall_pb2.SealResponse,
    "Unseal": ecall_pb2.UnsealResponse,
    "GetStatus": ecall_pb2.GetStatusResponse,
}


# --- sealed commands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BadCommand:
    """A command that should be refused (or is, by chance, a valid one) and how it was made."""

    kind: str
    sealed: envelope_pb2.SealedCommand
    response_key: bytes = b""
    request_id: str = ""


def build_command(client: Client, call: bytes) -> command_pb2.Command:
    """The Command a well-behaved SDK would build for `client` (counter 1: a fresh account)."""
    command = command_pb2.Command(
        instance_id=client.instance_id,
        counter=1,
        request_id=uuid.uuid4().hex,
        response_key=secrets.token_bytes(32),
        call=call,
    )
    client.prove(command)
    return command


def _hostile_call(rng: random.Random, instance_id: str) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return random_message(rng, apps_pb2.AppCall.DESCRIPTOR).SerializeToString()
    if kind == 1:
        return mutate(rng, good_call(instance_id).SerializeToString())
    if kind == 2:
        return random_bytes(rng)
    if kind == 3:  # huge: over the enclave's memory budget
        put = apps_pb2.VaultPut(record_id="huge", data=big_bytes(rng, 300 * 1024))
        return apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=put)).SerializeToString()
    return mutate_message(rng, good_call(rng.choice(INSTANCES))).SerializeToString()


def _hostile_auth(rng: random.Random, command: command_pb2.Command) -> None:
    kind = rng.randrange(4)
    if kind == 0:
        command.auth.CopyFrom(random_message(rng, command_pb2.AuthProof.DESCRIPTOR))  # type: ignore[arg-type]
    elif kind == 1:
        command.auth.oauth2.jwt = rng.choice((*HOSTILE_TOKENS.values(), *HOSTILE_STRINGS))
    elif kind == 2:
        key = ed25519.Ed25519PrivateKey.generate()
        command.auth.signature.public_key = key.public_key().public_bytes_raw()
        command.auth.signature.signature = rng.choice((key.sign(b"other"), rng.randbytes(64), b""))
    else:
        command.auth.anonymous.account = rng.choice(("", "x" * 257, "mallory"))


BAD_KINDS = (
    "sealed-field",
    "sealed-suite",
    "plaintext-random",
    "plaintext-field",
    "plaintext-bytes",
    "call",
    "auth",
    "wrong-instance",
    "huge",
    "post-quantum",
)


def bad_command(rng: random.Random, world: World, instance_id: str) -> BadCommand:
    """A mutated SealedCommand, or a hostile plaintext sealed correctly, from a fresh sender."""
    sender = world.client(instance_id)
    command = build_command(sender, good_call(instance_id).SerializeToString())
    kind = rng.choice(BAD_KINDS)
    suite = crypto.X25519_SUITE
    instance_aad = instance_id
    if kind in ("sealed-field", "sealed-suite"):
        sealed = seal_plaintext(world.harness.keys, command.SerializeToString(), instance_id=instance_id)
        mutated = envelope_pb2.SealedCommand()
        mutated.CopyFrom(sealed)
        if kind == "sealed-suite":
            mutated.suite = rng.choice((0, 2, 3, 99, -1))  # type: ignore[assignment]
        else:
            donor = rng.choice(world.sealed_donors)
            mutated = mutate_message(rng, mutated)  # type: ignore[assignment]
            if rng.random() < 0.3:  # the encapsulated key or ciphertext of another command
                mutated.encapsulated_key = donor.encapsulated_key
        return BadCommand(kind, mutated, command.response_key, command.request_id)
    plaintext: bytes
    if kind == "plaintext-random":
        plaintext = random_message(rng, command_pb2.Command.DESCRIPTOR).SerializeToString()
    elif kind == "plaintext-field":
        plaintext = mutate_message(rng, command).SerializeToString()
    elif kind == "plaintext-bytes":
        plaintext = mutate(rng, command.SerializeToString())
    elif kind == "call":
        command.call = _hostile_call(rng, instance_id)
        sender.prove(command)  # correctly signed: the content is what is hostile
        plaintext = command.SerializeToString()
    elif kind == "auth":
        _hostile_auth(rng, command)
        plaintext = command.SerializeToString()
    elif kind == "wrong-instance":
        other = rng.choice([i for i in (*INSTANCES, "spare", "nope") if i != instance_id])
        if rng.random() < 0.5:
            command.instance_id = other
            sender.prove(command)
        else:
            instance_aad = other
        plaintext = command.SerializeToString()
    elif kind == "huge":
        field = rng.choice(("request_id", "response_key", "call", "jwt"))
        if field == "request_id":
            command.request_id = "r" * rng.choice((65, 70_000))
        elif field == "response_key":
            command.response_key = big_bytes(rng, rng.choice((0, 31, 33, 70_000)))
        elif field == "call":
            command.call = big_bytes(rng, 1024 * 1024)
        else:
            command.auth.oauth2.jwt = "e" * 100_000
        plaintext = command.SerializeToString()
    else:  # a valid command, but under the post-quantum suite with a mutated plaintext
        suite = crypto.MLKEM768X25519_SUITE
        plaintext = mutate(rng, command.SerializeToString())
    sealed = seal_plaintext(world.harness.keys, plaintext, instance_id=instance_aad, suite=suite)
    return BadCommand(kind, sealed, command.response_key, command.request_id)


def _changed(
    before: dict[tuple[str, ...], bytes], after: dict[tuple[str, ...], bytes]
) -> set[tuple[str, ...]]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def check_batch(rng: random.Random, world: World, instance_id: str, bad: BadCommand) -> tuple[str, bool]:
    """Run [good, bad, good] in one batch (bad at a random place); returns (label, bad accepted)."""
    good = [world.client(instance_id), world.client(instance_id)]
    sealed_good = [client.seal(good_call(instance_id)) for client in good]
    batch = [s.command for s in sealed_good]
    position = rng.randrange(3)
    batch.insert(position, bad.sealed)
    others = {i: world.head(i) for i in INSTANCES if i != instance_id}
    before, before_head = world.state_of(instance_id), world.head(instance_id)
    try:
        response = world.harness.execute(instance_id, batch)
    except EnclaveCallError as failure:  # one bad command must never sink the whole batch
        raise AssertionError(f"{bad.kind}: the whole batch failed: {failure}") from None
    outcomes = list(response.outcomes)
    assert len(outcomes) == 3, f"{bad.kind}: {len(outcomes)} outcomes for 3 commands"
    bad_outcome = outcomes.pop(position)
    for client, sealed, outcome in zip(good, sealed_good, outcomes, strict=True):
        assert outcome.accepted, f"{bad.kind}: a good command next to it was not accepted"
        client.read(sealed, outcome)  # opens, checks the receipt signature and its hashes
    if bad_outcome.accepted:
        return f"{bad.kind}:accepted", True
    label = _refusal_label(bad, bad_outcome, instance_id)
    assert [o.sequence for o in outcomes] == [before_head + 1, before_head + 2], f"{bad.kind}: sequence gap"
    assert len(response.entries) == 2, f"{bad.kind}: a refused command was logged"
    after = world.state_of(instance_id)
    changed = _changed(before, after)
    callers = {client.identity for client in good}
    stray = {key for key in changed if not callers & set(key)}
    if instance_id == "b":  # each good first vote also appends its voter to the poll's voter list
        listed = {key for key in stray if key[2:3] == ("voter",) and after[key].decode() in callers}
        grew = [apps_pb2.BallotRecord.FromString(s[("ballot", "poll")]).voters for s in (before, after)]
        assert len(listed) == grew[1] - grew[0] == len(callers), f"{bad.kind}: the voter list moved"
        stray -= listed | {("ballot", "poll")}
    assert not stray, f"{bad.kind}: a refused command changed {sorted(stray)}"
    assert {("counter", identity) for identity in callers} <= changed
    assert {i: world.head(i) for i in others} == others, f"{bad.kind}: another instance moved"
    return label, False


def _refusal_label(bad: BadCommand, outcome: envelope_pb2.CommandOutcome, instance_id: str) -> str:
    assert outcome.sequence == 0, f"{bad.kind}: a refused command got a sequence"
    if outcome.HasField("error"):
        code = outcome.error.code
        name = error_pb2.EcallErrorCode.Name(code).removeprefix("ECALL_ERROR_CODE_")
        if code == error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT:
            assert outcome.error.message == "command could not be opened", outcome.error.message
            assert not outcome.sealed_response, f"{bad.kind}: answered an unopenable command"
        else:
            assert code == error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, f"{bad.kind}: outcome error {name}"
            assert outcome.sealed_response
        return f"{bad.kind}:{name}"
    assert outcome.sealed_response, f"{bad.kind}: refused without any answer"
    try:  # opens only if the hostile plaintext kept our response key and request id
        response = commands.open_response(
            bad.response_key, outcome.sealed_response, instance_id, bad.request_id
        )
    except (DecryptionError, DecodeError, ValueError):
        return f"{bad.kind}:sealed-refusal"
    assert not response.HasField("receipt"), f"{bad.kind}: a refused command got a receipt"
    result = command_pb2.CommandResult.FromString(response.result)
    assert result.HasField("error"), f"{bad.kind}: refused, yet the result is not an error"
    return f"{bad.kind}:{error_pb2.EcallErrorCode.Name(result.error.code).removeprefix('ECALL_ERROR_CODE_')}"
