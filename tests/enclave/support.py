"""Test support: an enclave harness and a minimal client that seals commands with the SDK's sealer."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.dev import keyvault_standin
from veil.enclave import commands, wire
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.runner import RunnerOptions
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import apps_pb2, command_pb2, ecall_pb2, envelope_pb2, error_pb2
from veil.sdk.identity import AnonymousIdentity, Identity, OAuth2Identity, Scheme, SigningIdentity
from veil.sdk.sealing import SealedRequest, open_outcome, seal_plaintext, signing_bytes
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost

X25519 = envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM
PQ = envelope_pb2.HPKE_SUITE_MLKEM768X25519_SHA256_AES128GCM
NOW_MS = 1_800_000_000_000
#: The test keyvault's release-signing key: every harness enclave pins its public half.
KEYVAULT_RELEASE_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"veil test keyvault release key").digest()
)
KEYVAULT_RELEASE_PUBLIC_KEY = KEYVAULT_RELEASE_KEY.public_key().public_bytes_raw()


#: The test keyvault's signatures (`veil.dev.keyvault_standin`), by KEYVAULT_RELEASE_KEY unless
#: a test names another signer, and its head statements valid for a minute past NOW_MS.
wrap_key = partial(keyvault_standin.wrap_key, signer=KEYVAULT_RELEASE_KEY)
release_signature = partial(keyvault_standin.release_signature, signer=KEYVAULT_RELEASE_KEY)
head_statement = partial(
    keyvault_standin.head_statement, signer=KEYVAULT_RELEASE_KEY, not_after_unix_ms=NOW_MS + 60_000
)


def head_confirmation(
    instance_id: str,
    head: envelope_pb2.CommitHead,
    enclave_signing_public_key: bytes,
    signer: ed25519.Ed25519PrivateKey = KEYVAULT_RELEASE_KEY,
) -> envelope_pb2.HeadConfirmation:
    """The keyvault's AdvanceCommitHead confirmation that it holds `head`, for that enclave boot."""
    message = wire.head_confirmation_bytes(instance_id, head.sequence, head.hash, enclave_signing_public_key)
    return envelope_pb2.HeadConfirmation(
        instance_id=instance_id,
        head=head,
        signature=signer.sign(message),
        enclave_signing_public_key=enclave_signing_public_key,
    )


@dataclass
class KeyvaultView:
    """What the test keyvault holds for one instance: its registered genesis and its head."""

    genesis_hash: bytes
    config_hash: bytes
    head: envelope_pb2.CommitHead


#: A sealed command and what the client needs to read its answer: the SDK's.
Sealed = SealedRequest


@dataclass
class Client:
    """Seals commands to an enclave and opens its answers, checking receipts, with the SDK's
    proofs, sealing and receipt checks (`veil.dev.loadclient.Account` is the state host's
    equivalent); it builds the command itself so a test can name another instance in it."""

    keys: envelope_pb2.EnclavePublicKeys
    instance_id: str
    signer: ed25519.Ed25519PrivateKey | None = None
    account: str = "alice"
    jwt: str | None = None
    counter: int = 0
    receipts: list[envelope_pb2.Receipt] = field(default_factory=list)

    @property
    def identity(self) -> str:
        """The account the enclave will see."""
        if self.signer is not None:
            return self.signer.public_key().public_bytes_raw().hex()
        return self.account

    @property
    def credential(self) -> tuple[Scheme, Identity]:
        """How this client proves who it is, as an SDK identity: its signer, else its JWT, else
        its anonymous account name."""
        if self.signer is not None:
            return envelope_pb2.AUTH_SCHEME_SIGNATURE, SigningIdentity(self.signer)
        if self.jwt is not None:
            return envelope_pb2.AUTH_SCHEME_OAUTH2, OAuth2Identity(self.jwt)
        return envelope_pb2.AUTH_SCHEME_NONE, AnonymousIdentity(self.account)

    def prove(self, command: command_pb2.Command) -> None:
        """Attach this client's identity proof (the SDK's: signature, JWT or anonymous account)."""
        scheme, identity = self.credential
        command.auth.CopyFrom(identity.proof(scheme, signing_bytes(command)))

    def seal(
        self,
        call: apps_pb2.AppCall,
        *,
        counter: int | None = None,
        suite: int = X25519,
        aad_instance: str | None = None,
        command_instance: str | None = None,
        request_id: str | None = None,
    ) -> Sealed:
        """Seal `call`; by default with the next counter and a fresh request id."""
        if counter is None:
            self.counter += 1
            counter = self.counter
        command = command_pb2.Command(
            instance_id=command_instance or self.instance_id,
            counter=counter,
            request_id=str(uuid.uuid4()) if request_id is None else request_id,
            response_key=secrets.token_bytes(32),
            call=call.SerializeToString(),
        )
        self.prove(command)
        aad_instance = aad_instance or self.instance_id
        sealed = seal_plaintext(self.keys, command.SerializeToString(), instance_id=aad_instance, suite=suite)
        return Sealed(
            command.instance_id, command.request_id, counter, self.identity, command.response_key, sealed
        )

    def read(self, sealed: Sealed, outcome: envelope_pb2.CommandOutcome) -> command_pb2.CommandResult:
        """Open the sealed response and check its receipt (the SDK's checks); returns the result."""
        opened = open_outcome(sealed, outcome, self.keys.signing_public_key, query=sealed.counter == 0)
        if opened.receipt is not None:
            self.receipts.append(opened.receipt)
        return opened.result


@dataclass
class Harness:
    """An initialized in-process enclave reached through the host client."""

    enclave: Enclave
    host: EnclaveHost
    keys: envelope_pb2.EnclavePublicKeys
    data_keys: dict[tuple[str, int], bytes] = field(default_factory=dict)
    log: dict[str, list[envelope_pb2.LogEntry]] = field(default_factory=dict)
    keyvault: dict[str, KeyvaultView] = field(default_factory=dict)
    descriptors: dict[str, envelope_pb2.InstanceDescriptor] = field(default_factory=dict)
    #: False: heads are not advanced and confirmed after each batch (held answers stay held).
    auto_confirm: bool = True
    released: dict[tuple[str, int], bytes] = field(default_factory=dict)
    factory: Callable[[], Enclave] | None = None

    @classmethod
    def start(
        cls,
        enclave: Enclave,
        memory_budget_bytes: int = 0,
        keyvault_release_public_key: bytes = KEYVAULT_RELEASE_PUBLIC_KEY,
    ) -> Harness:
        """Initialize `enclave` behind an in-process host, pinned to the test keyvault."""
        host = EnclaveHost.from_dispatcher(Dispatcher(enclave))
        keys = host.initialize(
            memory_budget_bytes, keyvault_release_public_key=keyvault_release_public_key
        ).keys
        return cls(enclave=enclave, host=host, keys=keys)

    def restarted(self) -> Harness:
        """The next enclave boot of this host: same keyvault and log, keys released again."""
        assert self.factory is not None, "Harness.start(..., factory) to restart"
        new = Harness.start(self.factory())
        new.factory, new.keyvault, new.log = self.factory, self.keyvault, self.log
        for (instance_id, version), key in self.data_keys.items():
            new.provision(instance_id, version, key)
        return new

    def provision(self, instance_id: str, version: int = 1, key: bytes | None = None) -> bytes:
        """Release a data key to the enclave as the keyvault would."""
        key = key or secrets.token_bytes(32)
        self.host.provision_key(instance_id, version, wrap_key(self.keys, instance_id, version, key))
        self.data_keys[(instance_id, version)] = key
        return key

    def statement(
        self, instance_id: str, keyvault_head: envelope_pb2.CommitHead | None = None
    ) -> envelope_pb2.HeadStatement:
        """The test keyvault's statement for a fresh challenge: `keyvault_head`, else what it holds."""
        return self.statement_for(instance_id, self.host.issue_challenge(instance_id), keyvault_head)

    def statement_for(
        self, instance_id: str, challenge: bytes, keyvault_head: envelope_pb2.CommitHead | None = None
    ) -> envelope_pb2.HeadStatement:
        """The test keyvault's statement for `challenge`: `keyvault_head`, else what it holds."""
        view = self.keyvault.get(instance_id)
        head = keyvault_head if keyvault_head is not None else (view.head if view else None)
        if head is None or head.sequence == 0:
            return head_statement(self.keys, instance_id, challenge)
        assert view is not None, "a head statement needs a registered genesis"
        return head_statement(
            self.keys,
            instance_id,
            challenge,
            head,
            genesis_hash=view.genesis_hash,
            config_hash=view.config_hash,
        )

    def restore(
        self,
        instance_id: str,
        entries: Sequence[bytes | envelope_pb2.LogEntry],
        snapshot: envelope_pb2.EncryptedSnapshot | None = None,
        keyvault_head: envelope_pb2.CommitHead | None = None,
    ) -> envelope_pb2.CommitHead:
        """Restore with the test keyvault's statement (of `keyvault_head`, else of what it holds)."""
        restored = self.host.restore(
            instance_id,
            entries,
            snapshot,
            statement=self.statement(instance_id, keyvault_head),
            host_time_unix_ms=NOW_MS,
        )
        if restored.HasField("descriptor"):
            self.descriptors[instance_id] = restored.descriptor
        if restored.HasField("link"):
            self.advance(restored.link)
        return restored.head

    def advance(self, link: envelope_pb2.CommitLink) -> None:
        """Play the keyvault: take an enclave-signed link from the held head, then confirm it."""
        assert wire.verify_commit_link(link, self.keys.signing_public_key)
        view = self.keyvault.get(link.instance_id)
        if view is None:
            assert link.base.sequence == 0
            view = self.keyvault[link.instance_id] = KeyvaultView(
                link.genesis_hash, link.config_hash, envelope_pb2.CommitHead()
            )
        if link.head != view.head:  # the same head again is an idempotent repeat
            assert link.base == view.head or link.base.sequence == view.head.sequence == 0
            view.head = link.head
        if self.auto_confirm:
            self.confirm(link.instance_id)

    def confirm(self, instance_id: str) -> list[ecall_pb2.ReleasedHold]:
        """Confirm the test keyvault's head to the enclave; returns the released hold keys."""
        head = self.keyvault[instance_id].head
        return self._took(
            instance_id,
            self.host.confirm_head(head_confirmation(instance_id, head, self.keys.signing_public_key)),
        )

    def read_fence(self, instance_id: str) -> ecall_pb2.ConfirmHeadResponse:
        """Play the keyvault for a read fence: its statement for the instance's read challenge."""
        statement = self.statement_for(instance_id, self.host.issue_challenge(instance_id, reads=True))
        response = self.host.confirm_head(statement=statement)
        self._took(instance_id, response)
        return response

    def _took(
        self, instance_id: str, response: ecall_pb2.ConfirmHeadResponse
    ) -> list[ecall_pb2.ReleasedHold]:
        for hold in response.released:
            slot = (instance_id, -hold.read_round if hold.read_round else hold.held_until)
            self.released[slot] = hold.key
        if response.HasField("descriptor"):
            self.descriptors[instance_id] = response.descriptor
        return list(response.released)

    def unwrap(self, instance_id: str, held_until: int, outcome: envelope_pb2.CommandOutcome) -> None:
        """Open a held answer in place with its released hold key (as the honest host does)."""
        if held_until and outcome.sealed_response:
            key = self.released[(instance_id, held_until)]
            aad = wire.held_response_aad(instance_id, held_until)
            outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)

    def unwrap_read(self, instance_id: str, read_round: int, outcome: envelope_pb2.CommandOutcome) -> None:
        """Open a query answer held by a read round (after `read_fence` released it)."""
        if read_round and outcome.sealed_response:
            key = self.released[(instance_id, -read_round)]
            aad = wire.held_read_aad(instance_id, read_round)
            outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)

    def create_raw(
        self, instance_id: str, config: envelope_pb2.InstanceConfig
    ) -> ecall_pb2.CreateInstanceResponse:
        """The CreateInstance ECALL with a fresh "no such instance" statement, nothing else."""
        return self.host.create_instance(instance_id, config, self.statement(instance_id), NOW_MS)

    def create(self, instance_id: str, config: envelope_pb2.InstanceConfig) -> None:
        """Provision a key (if none) and create the instance, recording its genesis entry."""
        if not any(iid == instance_id for iid, _ in self.data_keys):
            self.provision(instance_id)
        created = self.host.create_instance(instance_id, config, self.statement(instance_id), NOW_MS)
        self.log[instance_id] = [created.entry]
        self.advance(created.link)  # the confirmation registers it and brings its descriptor

    def run(self, instance_id: str, *sealed: Sealed) -> list[envelope_pb2.CommandOutcome]:
        """Execute a batch and record its entries (answers unwrapped once confirmed)."""
        return list(self.execute(instance_id, [s.command for s in sealed]).outcomes)

    def execute(
        self, instance_id: str, commands: list[envelope_pb2.SealedCommand], now_ms: int = NOW_MS
    ) -> ecall_pb2.ExecuteBatchResponse:
        """`run` for sealed commands as they arrive from elsewhere (a gateway, an attacker): the
        whole response, its outcomes unwrapped in place once the test keyvault confirmed."""
        response = self.host.execute_batch(instance_id, commands, now_ms)
        if response.entries:
            self.log[instance_id].extend(response.entries)
        if response.HasField("link"):
            self.advance(response.link)
        if self.auto_confirm:
            if response.read_round:
                self.read_fence(instance_id)
            for outcome in response.outcomes:
                self.unwrap(instance_id, response.held_until, outcome)
                self.unwrap_read(instance_id, response.read_round, outcome)
        return response

    def call(self, client: Client, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        """One command in its own batch; returns the opened result."""
        sealed = client.seal(call)
        (outcome,) = self.run(client.instance_id, sealed)
        return client.read(sealed, outcome)

    def query(self, client: Client, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        """One read-only query."""
        sealed = client.seal(call, counter=0)
        response = self.host.query(client.instance_id, sealed.command, NOW_MS)
        if response.read_round and self.auto_confirm:
            self.read_fence(client.instance_id)
            self.unwrap_read(client.instance_id, response.read_round, response.outcome)
        return client.read(sealed, response.outcome)

    def client(self, instance_id: str, **kwargs: object) -> Client:
        """A client for `instance_id`."""
        return Client(self.keys, instance_id, **kwargs)  # type: ignore[arg-type]


def config(
    app: int = envelope_pb2.APP_KIND_VAULT, auth: int = envelope_pb2.AUTH_SCHEME_NONE, **kwargs: object
) -> envelope_pb2.InstanceConfig:
    """An InstanceConfig."""
    return envelope_pb2.InstanceConfig(app=app, auth_scheme=auth, **kwargs)  # type: ignore[arg-type]


# --- app calls ---------------------------------------------------------------------------------


def vault(**method: object) -> apps_pb2.AppCall:
    """AppCall(vault=VaultCall(<method>=...))."""
    return apps_pb2.AppCall(vault=apps_pb2.VaultCall(**method))  # type: ignore[arg-type]


def token(**method: object) -> apps_pb2.AppCall:
    """AppCall(token=TokenCall(<method>=...))."""
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(**method))  # type: ignore[arg-type]


def ballot(**method: object) -> apps_pb2.AppCall:
    """AppCall(ballot=BallotCall(<method>=...))."""
    return apps_pb2.AppCall(ballot=apps_pb2.BallotCall(**method))  # type: ignore[arg-type]


def error_code(result: command_pb2.CommandResult) -> str:
    """The result's error code name, or "OK"."""
    if not result.HasField("error"):
        return "OK"
    return error_pb2.EcallErrorCode.Name(result.error.code).removeprefix("ECALL_ERROR_CODE_")


def sim_runner(pki_dir: Path, platform_secret: Path, *, memory_mb: int | None = None) -> RunnerOptions:
    """A runner on the simulated quote and sealing providers, quoting with the dev PKI's PCK chain;
    `platform_secret` is the simulated node (runners sharing it can unseal each other's blobs)."""
    options = RunnerOptions(
        quote_provider="sim", seal_provider="sim", pck_dir=pki_dir, platform_secret=platform_secret
    )
    return options if memory_mb is None else replace(options, memory_mb=memory_mb)


# --- restore in parts, against a hostile host --------------------------------------------------


def vault_put(record_id: str, size: int) -> apps_pb2.AppCall:
    """A vault put of `size` bytes."""
    return vault(put=apps_pb2.VaultPut(record_id=record_id, data=b"x" * size))


def refused(call: Callable[[], object]) -> str:
    """The refusal of `call` as "CODE: message" (without the ECALL_ERROR_CODE_ prefix); never INTERNAL."""
    with pytest.raises(EnclaveCallError) as refusal:
        call()
    assert refusal.value.code != error_pb2.ECALL_ERROR_CODE_INTERNAL, refusal.value
    return f"{refusal.value.code_name.removeprefix('ECALL_ERROR_CODE_')}: {refusal.value.message}"


def observed(harness: Harness) -> tuple[bytes, bytes]:
    """Everything a refused call must leave as it was: instances, keys, heads and memory."""
    status = harness.host.get_status().SerializeToString(deterministic=True)
    return harness.enclave.state_digest(), status


def memory_used(harness: Harness) -> int:
    """The enclave's memory use as GetStatus reports it."""
    return harness.host.get_status().memory_used_bytes


def open_part(
    harness: Harness, instance_id: str, entries: Sequence[envelope_pb2.LogEntry], **kwargs: object
) -> ecall_pb2.RestoreResponse:
    """A restore's first part with `more`, under a fresh statement of what the test keyvault holds."""
    return harness.host.restore(
        instance_id,
        entries,
        statement=harness.statement(instance_id),
        host_time_unix_ms=NOW_MS,
        more=True,
        **kwargs,  # type: ignore[arg-type]
    )


def fork(logged: Harness, account: str) -> list[envelope_pb2.LogEntry]:
    """Two entries after the head of "v", written by another boot and never registered (the host
    keeps them; the keyvault stays where it was)."""
    boot = logged.restarted()
    boot.restore("v", logged.log["v"])
    client = boot.client("v", account=account)
    entries: list[envelope_pb2.LogEntry] = []
    for i in range(2):
        response = boot.host.execute_batch("v", [client.seal(vault_put(f"{account}{i}", 8)).command], NOW_MS)
        entries.extend(response.entries)
    head = len(logged.log["v"])
    assert [e.sequence for e in entries] == [head + 1, head + 2]
    return entries
