"""Seal a command to an attested enclave and open its answer, checking the receipt.

Every byte string here is built by the enclave's own wire helpers (veil.enclave.wire,
veil.enclave.crypto, veil.enclave.commands), so the client and the enclave cannot drift apart:
HPKE info/AAD, the signed command bytes, the response AAD and the receipt bytes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from veil.enclave import commands, crypto, wire
from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2
from veil.sdk.errors import CommandRefused, ForeignAnswer, IntegrityError
from veil.sdk.identity import Identity

X25519_SUITE = crypto.X25519_SUITE
MLKEM768X25519_SUITE = crypto.MLKEM768X25519_SUITE


@dataclass(frozen=True)
class SealedRequest:
    """A sealed command and what the client keeps to read its answer."""

    instance_id: str
    request_id: str
    counter: int
    account: str
    response_key: bytes
    command: envelope_pb2.SealedCommand


@dataclass(frozen=True)
class Opened:
    """A verified answer: the app's result (or refusal), the receipt and the log position."""

    request_id: str
    result: command_pb2.CommandResult
    receipt: envelope_pb2.Receipt | None
    accepted: bool
    sequence: int
    #: The enclave proved the command ran (its counter names this command) but the answer was
    #: lost (a host restart, or a host that withheld it): `result` is empty.
    result_lost: bool = False


def seal_command(
    keys: envelope_pb2.EnclavePublicKeys,
    *,
    instance_id: str,
    scheme: envelope_pb2.AuthScheme.ValueType,
    identity: Identity,
    call: apps_pb2.AppCall,
    counter: int,
    request_id: str,
    suite: int = X25519_SUITE,
) -> SealedRequest:
    """Build, prove and HPKE-seal one command to the enclave's key."""
    command = command_pb2.Command(
        instance_id=instance_id,
        counter=counter,
        request_id=request_id,
        response_key=secrets.token_bytes(crypto.KEY_SIZE),
        call=call.SerializeToString(deterministic=True),
    )
    command.auth.CopyFrom(identity.proof(scheme, signing_bytes(command)))
    sealed = seal_plaintext(
        keys, command.SerializeToString(deterministic=True), instance_id=instance_id, suite=suite
    )
    return SealedRequest(
        instance_id=instance_id,
        request_id=request_id,
        counter=counter,
        account=_account(identity),
        response_key=command.response_key,
        command=sealed,
    )


def signing_bytes(command: command_pb2.Command) -> bytes:
    """What a signature proof covers: the command's instance, counter, request, response key and
    call, exactly as the enclave checks it (veil.enclave.wire.command_proof_bytes)."""
    return wire.command_proof_bytes(command)


def seal_plaintext(
    keys: envelope_pb2.EnclavePublicKeys, plaintext: bytes, *, instance_id: str, suite: int = X25519_SUITE
) -> envelope_pb2.SealedCommand:
    """HPKE-seal a serialized Command to the enclave's key of `suite`, bound to `instance_id`."""
    public = keys.hpke_x25519_public_key if suite == X25519_SUITE else keys.hpke_mlkem768x25519_public_key
    enc, ciphertext = crypto.hpke_seal(
        suite, public, plaintext, info=wire.COMMAND_INFO, aad=wire.command_aad(instance_id)
    )
    return envelope_pb2.SealedCommand(
        suite=suite,  # type: ignore[arg-type]  # one of the two HpkeSuite values
        encapsulated_key=enc,
        ciphertext=ciphertext,
    )


def _account(identity: Identity) -> str:
    return identity.account


def open_outcome(
    request: SealedRequest,
    outcome: envelope_pb2.CommandOutcome,
    signing_public_key: bytes,
    *,
    query: bool,
) -> Opened:
    """Open and verify the enclave's answer; CommandRefused if it could not open the command."""
    if not outcome.sealed_response:
        if outcome.HasField("error"):
            raise CommandRefused(outcome.error.code, outcome.error.message)
        raise IntegrityError("the outcome carries no sealed response")
    try:
        response = commands.open_response(
            request.response_key, outcome.sealed_response, request.instance_id, request.request_id
        )
        result = command_pb2.CommandResult.FromString(response.result)
    except (DecryptionError, DecodeError):
        raise ForeignAnswer("the response does not authenticate under this request's key") from None
    if response.request_id != request.request_id:
        raise IntegrityError("the response answers another request")
    receipt = response.receipt if response.HasField("receipt") else None
    if receipt is not None:
        _check_receipt(receipt, request, response.result, outcome, signing_public_key, query=query)
    elif outcome.accepted or (query and not result.HasField("error")):
        raise IntegrityError("the enclave's answer lacks its signed receipt")
    return Opened(
        request_id=request.request_id,
        result=result,
        receipt=receipt,
        accepted=outcome.accepted,
        sequence=receipt.sequence if receipt is not None else 0,
    )


def _check_receipt(
    receipt: envelope_pb2.Receipt,
    request: SealedRequest,
    result_bytes: bytes,
    outcome: envelope_pb2.CommandOutcome,
    signing_public_key: bytes,
    *,
    query: bool,
) -> None:
    if not wire.verify_receipt(receipt, signing_public_key):
        raise IntegrityError("the receipt's signature is not the attested enclave's")
    if receipt.instance_id != request.instance_id:
        raise IntegrityError("the receipt is for another instance")
    if receipt.command_hash != wire.command_hash(
        request.command.encapsulated_key, request.command.ciphertext
    ):
        raise IntegrityError("the receipt is for another command")
    if receipt.result_hash != hashlib.sha256(result_bytes).digest():
        raise IntegrityError("the receipt is for another result")
    expected_kind = envelope_pb2.RECEIPT_KIND_QUERY if query else envelope_pb2.RECEIPT_KIND_COMMAND
    if receipt.kind != expected_kind:
        raise IntegrityError("the receipt is of the wrong kind")
    if not query and (not outcome.accepted or receipt.sequence != outcome.sequence):
        raise IntegrityError("the receipt's sequence does not match the committed outcome")


def verify_receipt(receipt: envelope_pb2.Receipt, signing_public_key: bytes) -> bool:
    """True when a stored receipt carries the enclave's signature (for later audits)."""
    return wire.verify_receipt(receipt, signing_public_key)
