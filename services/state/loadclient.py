"""A small command-sealing client for the state benchmark and tests (a stand-in for the SDK).

It HPKE-seals a Command to the enclave's attested key, signs it (AUTH_SCHEME_SIGNATURE) or
names an anonymous account (AUTH_SCHEME_NONE), and opens the sealed response, checking the
enclave's receipt signature. It speaks to the state service directly, as the gateway would.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.enclave import commands, crypto, wire
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2


@dataclass
class Sealed:
    """A sealed command and what its sender needs to read the answer."""

    command: envelope_pb2.SealedCommand
    response_key: bytes
    request_id: str
    signing_public_key: bytes  # of the enclave it was sealed to: its receipt must verify under it


@dataclass
class Account:
    """One client identity on one instance, with its command counter."""

    keys: envelope_pb2.EnclavePublicKeys
    instance_id: str
    signer: ed25519.Ed25519PrivateKey | None = None
    name: str = "anonymous"
    counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def account(self) -> str:
        """The account the enclave sees: the public key's hex, or the anonymous name."""
        if self.signer is not None:
            return self.signer.public_key().public_bytes_raw().hex()
        return self.name

    def next_counter(self) -> int:
        with self._lock:
            self.counter += 1
            return self.counter

    def seal(
        self, call: apps_pb2.AppCall, *, counter: int | None = None, request_id: str | None = None
    ) -> Sealed:
        """Seal `call` (by default with the next counter and a fresh request id)."""
        request_id = request_id or uuid.uuid4().hex
        response_key = secrets.token_bytes(32)
        call_bytes = call.SerializeToString()
        command = command_pb2.Command(
            instance_id=self.instance_id,
            counter=self.next_counter() if counter is None else counter,
            request_id=request_id,
            response_key=response_key,
            call=call_bytes,
        )
        if self.signer is not None:
            message = wire.command_signing_bytes(
                instance_id=self.instance_id,
                counter=command.counter,
                request_id=request_id,
                response_key=response_key,
                call=call_bytes,
            )
            command.auth.signature.public_key = self.signer.public_key().public_bytes_raw()
            command.auth.signature.signature = self.signer.sign(message)
        else:
            command.auth.anonymous.account = self.name
        enc, ciphertext = crypto.hpke_seal(
            crypto.X25519_SUITE,
            self.keys.hpke_x25519_public_key,
            command.SerializeToString(),
            info=wire.COMMAND_INFO,
            aad=wire.command_aad(self.instance_id),
        )
        sealed = envelope_pb2.SealedCommand(
            suite=crypto.X25519_SUITE, encapsulated_key=enc, ciphertext=ciphertext
        )
        return Sealed(sealed, response_key, request_id, self.keys.signing_public_key)

    def open(self, sealed: Sealed, outcome: envelope_pb2.CommandOutcome) -> command_pb2.CommandResult:
        """Open the sealed response; checks the receipt against the enclave the command was sealed to."""
        response = commands.open_response(
            sealed.response_key, outcome.sealed_response, self.instance_id, sealed.request_id
        )
        if response.HasField("receipt") and not wire.verify_receipt(
            response.receipt, sealed.signing_public_key
        ):
            raise ValueError("the receipt is not signed by the attested enclave")
        return command_pb2.CommandResult.FromString(response.result)


def token_config(issuer: ed25519.Ed25519PrivateKey) -> envelope_pb2.InstanceConfig:
    """A token instance whose mints are signed by `issuer`."""
    return envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_TOKEN,
        auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        token_issuer_public_key=issuer.public_key().public_bytes_raw(),
    )


def vault_config() -> envelope_pb2.InstanceConfig:
    """A vault instance without authorization (anonymous accounts)."""
    return envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_NONE
    )


def mint(to: str, amount: int) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(mint=apps_pb2.TokenMint(to=to, amount=amount)))


def transfer(to: str, amount: int) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=to, amount=amount)))


def balance() -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(balance=apps_pb2.TokenBalance()))


def total_supply() -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(total_supply=apps_pb2.TokenTotalSupply()))


def vault_put(record_id: str, data: bytes) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id=record_id, data=data)))


def ballot_config() -> envelope_pb2.InstanceConfig:
    """A ballot instance without authorization (anonymous voters)."""
    return envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_BALLOT, auth_scheme=envelope_pb2.AUTH_SCHEME_NONE
    )


def ballot_create(ballot_id: str, question: str, options: Sequence[str]) -> apps_pb2.AppCall:
    create = apps_pb2.BallotCreate(ballot_id=ballot_id, question=question, options=options)
    return apps_pb2.AppCall(ballot=apps_pb2.BallotCall(create=create))


def ballot_vote(ballot_id: str, option: int, salt: bytes) -> apps_pb2.AppCall:
    vote = apps_pb2.BallotVote(ballot_id=ballot_id, option=option, salt=salt)
    return apps_pb2.AppCall(ballot=apps_pb2.BallotCall(vote=vote))


def ballot_close(ballot_id: str) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(ballot=apps_pb2.BallotCall(close=apps_pb2.BallotClose(ballot_id=ballot_id)))
