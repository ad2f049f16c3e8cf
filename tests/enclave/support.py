"""Test support: an enclave harness and a minimal client that seals commands like the SDK."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2, error_pb2

from enclave import commands, crypto, wire
from enclave.dispatcher import Dispatcher
from enclave.runtime import Enclave
from services.state.enclave_host import EnclaveHost

X25519 = envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM
PQ = envelope_pb2.HPKE_SUITE_MLKEM768X25519_SHA256_AES128GCM
NOW_MS = 1_800_000_000_000
#: The test keyvault's release-signing key: every harness enclave pins its public half.
KEYVAULT_RELEASE_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"veil test keyvault release key").digest()
)
KEYVAULT_RELEASE_PUBLIC_KEY = KEYVAULT_RELEASE_KEY.public_key().public_bytes_raw()


def wrap_key(
    keys: envelope_pb2.EnclavePublicKeys,
    instance_id: str,
    version: int,
    key: bytes,
    signer: ed25519.Ed25519PrivateKey | None = KEYVAULT_RELEASE_KEY,
) -> envelope_pb2.WrappedKey:
    """Wrap and sign a data key exactly as the keyvault does (`signer` None: unsigned)."""
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    public = x25519.X25519PublicKey.from_public_bytes(keys.hpke_x25519_public_key)
    key_name = wire.instance_key_name(instance_id)
    sealed = suite.encrypt(key, public, info=wire.key_release_info(key_name, version))
    wrapped = envelope_pb2.WrappedKey(suite=X25519, encapsulated_key=sealed[:32], ciphertext=sealed[32:])
    if signer is not None:
        wrapped.signature = release_signature(wrapped, key_name, version, keys.hpke_x25519_public_key, signer)
    return wrapped


def release_signature(
    wrapped: envelope_pb2.WrappedKey,
    key_name: str,
    version: int,
    recipient_hpke_public_key: bytes,
    signer: ed25519.Ed25519PrivateKey = KEYVAULT_RELEASE_KEY,
) -> bytes:
    """A keyvault release signature over `wrapped` for any (name, version, recipient)."""
    message = wire.wrapped_key_signing_bytes(
        key_name, version, recipient_hpke_public_key, wrapped.encapsulated_key, wrapped.ciphertext
    )
    return signer.sign(message)


def head_statement(
    keys: envelope_pb2.EnclavePublicKeys,
    instance_id: str,
    head: envelope_pb2.CommitHead | None = None,
    signer: ed25519.Ed25519PrivateKey = KEYVAULT_RELEASE_KEY,
) -> bytes:
    """The keyvault's GetCommitHead freshness signature over `head` for the enclave of `keys`."""
    head = head or envelope_pb2.CommitHead()
    message = wire.head_freshness_bytes(instance_id, head.sequence, head.hash, keys.signing_public_key)
    return signer.sign(message)


@dataclass
class Sealed:
    """A sealed command and what the client needs to read its answer."""

    command: envelope_pb2.SealedCommand
    response_key: bytes
    instance_id: str
    request_id: str


@dataclass
class Client:
    """Seals commands to an enclave and opens its answers, checking receipts."""

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

    def prove(self, command: command_pb2.Command) -> None:
        """Attach this client's identity proof (signature, JWT or anonymous account) to `command`."""
        if self.signer is not None:
            message = wire.command_signing_bytes(
                instance_id=command.instance_id,
                counter=command.counter,
                request_id=command.request_id,
                response_key=command.response_key,
                call=command.call,
            )
            command.auth.signature.public_key = self.signer.public_key().public_bytes_raw()
            command.auth.signature.signature = self.signer.sign(message)
        elif self.jwt is not None:
            command.auth.oauth2.jwt = self.jwt
        else:
            command.auth.anonymous.account = self.account

    def seal(
        self,
        call: apps_pb2.AppCall,
        *,
        counter: int | None = None,
        suite: int = X25519,
        aad_instance: str | None = None,
        command_instance: str | None = None,
    ) -> Sealed:
        """Seal `call`; by default with the next counter."""
        if counter is None:
            self.counter += 1
            counter = self.counter
        command = command_pb2.Command(
            instance_id=command_instance or self.instance_id,
            counter=counter,
            request_id=str(uuid.uuid4()),
            response_key=secrets.token_bytes(32),
            call=call.SerializeToString(),
        )
        self.prove(command)
        public = (
            self.keys.hpke_x25519_public_key if suite == X25519 else self.keys.hpke_mlkem768x25519_public_key
        )
        enc, ciphertext = crypto.hpke_seal(
            suite,
            public,
            command.SerializeToString(),
            info=wire.COMMAND_INFO,
            aad=wire.command_aad(aad_instance or self.instance_id),
        )
        sealed = envelope_pb2.SealedCommand(suite=suite, encapsulated_key=enc, ciphertext=ciphertext)  # type: ignore[arg-type]
        return Sealed(sealed, command.response_key, command.instance_id, command.request_id)

    def read(self, sealed: Sealed, outcome: envelope_pb2.CommandOutcome) -> command_pb2.CommandResult:
        """Open the sealed response and check its receipt; returns the command result."""
        assert outcome.sealed_response, f"no sealed response: {outcome.error}"
        response = commands.open_response(
            sealed.response_key, outcome.sealed_response, sealed.instance_id, sealed.request_id
        )
        assert response.request_id == sealed.request_id
        if response.HasField("receipt"):
            receipt = response.receipt
            assert wire.verify_receipt(receipt, self.keys.signing_public_key)
            assert receipt.result_hash == hashlib.sha256(response.result).digest()
            assert receipt.command_hash == wire.command_hash(
                sealed.command.encapsulated_key, sealed.command.ciphertext
            )
            assert receipt.instance_id == sealed.instance_id
            if outcome.accepted:
                assert receipt.kind == envelope_pb2.RECEIPT_KIND_COMMAND
                assert receipt.sequence == outcome.sequence
            self.receipts.append(receipt)
        return command_pb2.CommandResult.FromString(response.result)


@dataclass
class Harness:
    """An initialized in-process enclave reached through the host client."""

    enclave: Enclave
    host: EnclaveHost
    keys: envelope_pb2.EnclavePublicKeys
    data_keys: dict[tuple[str, int], bytes] = field(default_factory=dict)
    log: dict[str, list[envelope_pb2.LogEntry]] = field(default_factory=dict)

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

    def provision(self, instance_id: str, version: int = 1, key: bytes | None = None) -> bytes:
        """Release a data key to the enclave as the keyvault would."""
        key = key or secrets.token_bytes(32)
        self.host.provision_key(instance_id, version, wrap_key(self.keys, instance_id, version, key))
        self.data_keys[(instance_id, version)] = key
        return key

    def restore(
        self,
        instance_id: str,
        entries: list[envelope_pb2.LogEntry],
        snapshot: envelope_pb2.EncryptedSnapshot | None = None,
        keyvault_head: envelope_pb2.CommitHead | None = None,
    ) -> envelope_pb2.CommitHead:
        """Restore with the test keyvault's statement of `keyvault_head` (None: it knows no head)."""
        head = keyvault_head or envelope_pb2.CommitHead()
        return self.host.restore(
            instance_id,
            entries,
            snapshot,
            keyvault_head=head,
            keyvault_head_signature=head_statement(self.keys, instance_id, head),
        )

    def create(self, instance_id: str, config: envelope_pb2.InstanceConfig) -> None:
        """Provision a key (if none) and create the instance, recording its genesis entry."""
        if not any(iid == instance_id for iid, _ in self.data_keys):
            self.provision(instance_id)
        created = self.host.create_instance(instance_id, config)
        self.log[instance_id] = [created.entry]

    def run(self, instance_id: str, *sealed: Sealed) -> list[envelope_pb2.CommandOutcome]:
        """Execute a batch and record its entries."""
        response = self.host.execute_batch(instance_id, [s.command for s in sealed], NOW_MS)
        self.log[instance_id].extend(response.entries)
        return list(response.outcomes)

    def call(self, client: Client, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        """One command in its own batch; returns the opened result."""
        sealed = client.seal(call)
        (outcome,) = self.run(client.instance_id, sealed)
        return client.read(sealed, outcome)

    def query(self, client: Client, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        """One read-only query."""
        sealed = client.seal(call, counter=0)
        return client.read(sealed, self.host.query(client.instance_id, sealed.command, NOW_MS))

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
