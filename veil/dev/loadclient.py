"""Accounts that seal commands straight to a state service: the state benchmark's and tests' client.

It speaks to the state service directly, as the gateway would, with the SDK's own sealer
(`veil.sdk.sealing`): an Ed25519 identity signs (AUTH_SCHEME_SIGNATURE) or an anonymous
account is named (AUTH_SCHEME_NONE), the command is HPKE-sealed to the enclave's attested key,
and the sealed answer is opened and its receipt checked against the enclave it was sealed to.
What it adds is the state host's view: one account per identity with its own counter, and no
gateway, attestation or retries in between. Counter 0 is a read-only query.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2
from veil.sdk.identity import AnonymousIdentity, Identity, SigningIdentity
from veil.sdk.sealing import SealedRequest, open_outcome, seal_command


@dataclass(frozen=True)
class Sealed:
    """A sealed command and what its sender needs to read the answer."""

    request: SealedRequest
    signing_public_key: bytes  # of the enclave it was sealed to: its receipt must verify under it

    @property
    def command(self) -> envelope_pb2.SealedCommand:
        return self.request.command

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def response_key(self) -> bytes:
        return self.request.response_key


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
    def identity(self) -> Identity:
        """Who the commands say they are: the signer, or the anonymous account name."""
        if self.signer is not None:
            return SigningIdentity(self.signer, self.name)
        return AnonymousIdentity(self.name)

    @property
    def account(self) -> str:
        """The account the enclave sees: the public key's hex, or the anonymous name."""
        return self.identity.account

    def next_counter(self) -> int:
        with self._lock:
            self.counter += 1
            return self.counter

    def seal(
        self, call: apps_pb2.AppCall, *, counter: int | None = None, request_id: str | None = None
    ) -> Sealed:
        """Seal `call` (by default with the next counter and a fresh request id)."""
        scheme = (
            envelope_pb2.AUTH_SCHEME_SIGNATURE if self.signer is not None else envelope_pb2.AUTH_SCHEME_NONE
        )
        request = seal_command(
            self.keys,
            instance_id=self.instance_id,
            scheme=scheme,
            identity=self.identity,
            call=call,
            counter=self.next_counter() if counter is None else counter,
            request_id=request_id or uuid.uuid4().hex,
        )
        return Sealed(request, self.keys.signing_public_key)

    def open(self, sealed: Sealed, outcome: envelope_pb2.CommandOutcome) -> command_pb2.CommandResult:
        """Open the sealed response and check its receipt against the enclave it was sealed to."""
        opened = open_outcome(
            sealed.request, outcome, sealed.signing_public_key, query=sealed.request.counter == 0
        )
        return opened.result


def token_config(issuer: ed25519.Ed25519PrivateKey) -> envelope_pb2.InstanceConfig:
    """A token instance whose mints are signed by `issuer`."""
    return token_config_for(issuer.public_key().public_bytes_raw())


def token_config_for(issuer_public_key: bytes) -> envelope_pb2.InstanceConfig:
    """A token instance whose mints are signed by the holder of `issuer_public_key` (raw Ed25519):
    an SDK identity's ``public_key``."""
    return envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_TOKEN,
        auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        token_issuer_public_key=issuer_public_key,
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
