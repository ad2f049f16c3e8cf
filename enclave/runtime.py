"""The enclave runtime: its keys, its instances and the implementation of every ECALL.

Each method takes and returns the ECALL's protobuf messages and either succeeds or raises
`EnclaveError` having changed nothing: all checks come first, and a batch runs inside a store
transaction that is rolled back if anything unexpected happens. (One deliberate exception: a
challenge is used up by the CreateInstance or Restore that presents it, even a refused one.)

Against a hostile host: quotes cover only the enclave's own keys and the host's nonce;
creating or restoring an instance needs the keyvault's statement of its head for a challenge
this enclave issued; a loaded instance is never replaced, so within one boot it only moves
forward; heads reach the keyvault only as links this enclave signed from the previous head;
and a strict instance releases no answer until the keyvault confirms the head it depends on.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError

from veil.enclave import commands, crypto, wire
from veil.enclave.auth import Caller
from veil.enclave.errors import (
    ALREADY_EXISTS,
    DATA_LOSS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    DecryptionError,
    EnclaveError,
)
from veil.enclave.instance import CounterMismatch, Hold, Instance, ReadRound
from veil.enclave.providers import QuoteProvider, SealingProvider
from veil.enclave.store import Store
from veil.enclave.v1 import command_pb2, ecall_pb2, envelope_pb2, storage_pb2

DEFAULT_MEMORY_BUDGET = 96 * 1024 * 1024
_INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z: "$" also matches before a final "\n"
_ED25519_KEY_SIZE = 32
_X25519_ENC_SIZE = 32
MAX_CHALLENGES = 1024  # outstanding challenges; the oldest is dropped beyond this
MAX_HOLDS = 4096  # per instance: heads awaiting keyvault confirmation
MAX_READ_ROUNDS = 256  # per instance: query rounds awaiting a read fence
# A command's entry records its writes (restore applies them, fast) while that keeps the entry
# within this many bytes over the call, else the call (restore runs it again): a tiny command
# can rewrite a whole record or, a ballot's close, O(voters) keys, and must not bloat the log.
LOGGED_WRITES_OVER_CALL = 1024


def _data_loss(what: str) -> EnclaveError:
    return EnclaveError(DATA_LOSS, f"{what}: decryption failed")


def _stale(what: str) -> EnclaveError:
    return EnclaveError(FAILED_PRECONDITION, f"rollback refused: {what}")


def _loaded_already() -> EnclaveError:
    return EnclaveError(ALREADY_EXISTS, "instance is loaded; within one enclave boot it only moves forward")


def _parse_entries(blobs: Iterable[bytes]) -> Iterator[envelope_pb2.LogEntry]:
    """Restore's entries, sent as stored (the host does not parse them), parsed one at a time
    as the replay reaches them (a whole parsed log at once costs memory and cache)."""
    for position, blob in enumerate(blobs):
        try:
            yield envelope_pb2.LogEntry.FromString(blob)
        except DecodeError:
            raise EnclaveError(DATA_LOSS, f"entry {position} of the restore request is unreadable") from None


@dataclass
class _OpenRestore:
    """A restore sent in parts: what its first part set up, kept for the parts that continue it."""

    instance_id: str
    statement: envelope_pb2.HeadStatement
    chain: wire.EntryChain
    ciphers: dict[int, crypto.AeadKey]
    instance: Instance | None


class Enclave:
    """The trusted state machine behind the ECALL table."""

    def __init__(
        self,
        *,
        mrenclave: bytes,
        quote_provider: QuoteProvider,
        sealing_provider: SealingProvider,
        default_memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.mrenclave = mrenclave
        self._quotes = quote_provider
        self._sealing = sealing_provider
        self._budget = default_memory_budget
        self._hpke: crypto.HpkeKeyPairs | None = None
        self._signing_key: ed25519.Ed25519PrivateKey | None = None
        # The keyvault whose key releases we accept, pinned at Initialize (raw Ed25519 bytes).
        self._release_key = b""
        self._instances: dict[str, Instance] = {}
        self._data_keys: dict[str, dict[int, bytes]] = {}
        self._challenges: dict[str, bytes] = {}  # instance id -> its one outstanding challenge
        self._restoring: _OpenRestore | None = None  # a restore whose next part is awaited

    # --- helpers -------------------------------------------------------------------------

    def _ready(self) -> tuple[crypto.HpkeKeyPairs, ed25519.Ed25519PrivateKey]:
        if self._hpke is None or self._signing_key is None:
            raise EnclaveError(FAILED_PRECONDITION, "enclave not initialized")
        return self._hpke, self._signing_key

    def _instance(self, instance_id: str) -> Instance:
        self._ready()
        instance = self._instances.get(instance_id)
        if instance is None:
            raise EnclaveError(NOT_FOUND, "unknown instance")
        return instance

    def _key(self, instance_id: str, version: int) -> bytes:
        key = self._data_keys.get(instance_id, {}).get(version)
        if key is None:
            raise EnclaveError(
                FAILED_PRECONDITION, f"key version {version} of {instance_id!r} not provisioned"
            )
        return key

    def _current_key(self, instance_id: str) -> tuple[int, bytes]:
        versions = self._data_keys.get(instance_id)
        if not versions:
            raise EnclaveError(FAILED_PRECONDITION, f"no data key provisioned for {instance_id!r}")
        version = max(versions)
        return version, versions[version]

    def memory_used(self) -> int:
        """Bytes of state held for all instances, one being restored included."""
        used = sum(instance.store.size for instance in self._instances.values())
        if self._restoring is not None and self._restoring.instance is not None:
            used += self._restoring.instance.store.size
        return used

    def _limit_for(self, instance: Instance | None) -> int:
        """The size `instance`'s state may reach within the budget (None: one not held yet)."""
        return self._budget - self.memory_used() + (instance.store.size if instance is not None else 0)

    def _link(self, instance: Instance, base: envelope_pb2.CommitHead) -> envelope_pb2.CommitLink:
        """A signed link from `base` to the instance's head, for the keyvault's compare and set."""
        _, signing_key = self._ready()
        link = envelope_pb2.CommitLink(
            instance_id=instance.instance_id,
            genesis_hash=instance.genesis_hash,
            config_hash=wire.config_hash(instance.config_bytes),
            base=envelope_pb2.CommitHead(sequence=base.sequence, hash=base.hash or wire.ZERO_HASH),
            head=instance.head(),
        )
        link.signature = signing_key.sign(wire.commit_link_bytes(link))
        return link

    def _descriptor(self, instance: Instance) -> envelope_pb2.InstanceDescriptor:
        """The instance's identity (id, configuration, genesis) signed by this enclave."""
        _, signing_key = self._ready()
        config = instance.config_bytes
        message = wire.instance_descriptor_bytes(
            instance.instance_id, wire.config_hash(config), instance.genesis_hash
        )
        return envelope_pb2.InstanceDescriptor(
            instance_id=instance.instance_id,
            config=config,
            genesis_hash=instance.genesis_hash,
            signature=signing_key.sign(message),
        )

    def _hold(self, instance: Instance) -> None:
        """A new head of a holding instance: answers that depend on it wait for its confirmation.
        Its key is the one the keyvault derives from the newest data key once it holds the head
        (wire.hold_key), so the host can get it from there without a ConfirmHead ECALL."""
        if instance.holding:
            own_key = self._ready()[1].public_key().public_bytes_raw()
            version, data_key = self._current_key(instance.instance_id)
            root = wire.hold_root(data_key)
            key = wire.hold_key(root, instance.instance_id, instance.sequence, instance.head_hash, own_key)
            instance.holds.append(Hold(instance.sequence, instance.head_hash, key, version))

    @staticmethod
    def _wrap_held(instance: Instance, outcomes: list[envelope_pb2.CommandOutcome]) -> int:
        """Seal answers under the newest unconfirmed head's hold key; the head sequence, or 0."""
        # A fast instance answers at once once live; its holds from before keep their own answers.
        if not instance.holding or not instance.holds:
            return 0
        hold = instance.holds[-1]
        Enclave._seal_answers(outcomes, hold.key, wire.held_response_aad(instance.instance_id, hold.sequence))
        return hold.sequence

    @staticmethod
    def _wrap_read(instance: Instance, outcomes: list[envelope_pb2.CommandOutcome]) -> int:
        """Seal answers that read the head under the open read round's key; the round, or 0."""
        if not instance.holding or not any(outcome.sealed_response for outcome in outcomes):
            return 0
        if not instance.reads or instance.reads[-1].closed:
            if len(instance.reads) >= MAX_READ_ROUNDS:
                raise EnclaveError(FAILED_PRECONDITION, "too many reads await a keyvault read fence")
            instance.read_rounds += 1
            instance.reads.append(ReadRound(instance.read_rounds, 0, secrets.token_bytes(crypto.KEY_SIZE)))
        read = instance.reads[-1]
        read.sequence = max(read.sequence, instance.sequence)
        Enclave._seal_answers(outcomes, read.key, wire.held_read_aad(instance.instance_id, read.number))
        return read.number

    @staticmethod
    def _seal_answers(outcomes: list[envelope_pb2.CommandOutcome], key: bytes, aad: bytes) -> None:
        """Seal each answer again under a key the enclave gives out only once the keyvault has confirmed."""
        for outcome in outcomes:
            if outcome.sealed_response:
                outcome.sealed_response = crypto.seal_blob(key, outcome.sealed_response, aad)

    @staticmethod
    def _check_shape(statement: envelope_pb2.HeadStatement) -> None:
        """Sizes and times the signed bytes can hold, checked before anything is built from them."""
        head = statement.head
        sizes = (len(head.hash), len(statement.genesis_hash), len(statement.config_hash))
        if sizes != ((wire.HASH_SIZE,) * 3 if head.sequence else (0,) * 3) or statement.not_after_unix_ms < 0:
            raise EnclaveError(INVALID_ARGUMENT, "malformed head statement")

    def _check_statement(self, instance_id: str, statement: envelope_pb2.HeadStatement, now_ms: int) -> None:
        """Accept the keyvault's head statement only for this enclave and its current challenge."""
        _, signing_key = self._ready()
        # Used up whatever happens next: one statement, one attempt, made after the challenge.
        challenge = self._challenges.pop(instance_id, None)
        self._check_shape(statement)
        if statement.instance_id != instance_id:
            raise EnclaveError(INVALID_ARGUMENT, "malformed head statement")
        if challenge is None or not hmac.compare_digest(statement.challenge, challenge):
            raise _stale("the head statement does not answer this enclave's current challenge")
        if statement.enclave_signing_public_key != signing_key.public_key().public_bytes_raw():
            raise _stale("the head statement is for another enclave")
        if statement.not_after_unix_ms < now_ms:
            raise _stale("the head statement has expired")
        if not wire.verify_ed25519(
            self._release_key, statement.signature, wire.head_statement_bytes(statement)
        ):
            raise _stale("the head statement is not signed by the pinned keyvault")

    def _receipt(
        self,
        kind: envelope_pb2.ReceiptKind.ValueType,
        instance_id: str,
        sequence: int,
        command_hash: bytes,
        result: bytes,
    ) -> envelope_pb2.Receipt:
        _, signing_key = self._ready()
        receipt = envelope_pb2.Receipt(
            kind=kind,
            instance_id=instance_id,
            sequence=sequence,
            command_hash=command_hash,
            result_hash=hashlib.sha256(result).digest(),
        )
        receipt.signature = signing_key.sign(wire.receipt_signing_bytes(receipt))
        return receipt

    def _encrypt_entry(
        self, instance_id: str, sequence: int, previous_hash: bytes, body: storage_pb2.EntryBody
    ) -> envelope_pb2.LogEntry:
        version, key = self._current_key(instance_id)
        aad = wire.entry_aad(instance_id, sequence, version, previous_hash)
        nonce, ciphertext = crypto.aead_seal(key, body.SerializeToString(deterministic=True), aad)
        return envelope_pb2.LogEntry(
            instance_id=instance_id,
            sequence=sequence,
            key_version=version,
            previous_hash=previous_hash,
            nonce=nonce,
            ciphertext=ciphertext,
        )

    # --- ECALLs --------------------------------------------------------------------------

    def initialize(self, request: ecall_pb2.InitializeRequest) -> ecall_pb2.InitializeResponse:
        """Pin the keyvault release key, generate the key pairs and fix the memory budget."""
        if self._hpke is not None:
            raise EnclaveError(FAILED_PRECONDITION, "enclave already initialized")
        if len(request.keyvault_release_public_key) != _ED25519_KEY_SIZE:
            # Without a pinned keyvault, any host could provision keys it knows: fail closed.
            raise EnclaveError(INVALID_ARGUMENT, "keyvault_release_public_key must be 32 bytes (Ed25519)")
        self._release_key = request.keyvault_release_public_key
        self._hpke = crypto.HpkeKeyPairs()
        self._signing_key = ed25519.Ed25519PrivateKey.generate()
        if request.memory_budget_bytes:
            self._budget = request.memory_budget_bytes
        return ecall_pb2.InitializeResponse(keys=self.public_keys(), mrenclave=self.mrenclave)

    def public_keys(self) -> envelope_pb2.EnclavePublicKeys:
        """The keys a quote binds (serialized deterministically as runtime data by the host)."""
        hpke, signing_key = self._ready()
        return envelope_pb2.EnclavePublicKeys(
            hpke_x25519_public_key=hpke.x25519_public,
            hpke_mlkem768x25519_public_key=hpke.hybrid_public,
            signing_public_key=signing_key.public_key().public_bytes_raw(),
            keyvault_release_public_key=self._release_key,
        )

    def get_quote(self, request: ecall_pb2.GetQuoteRequest) -> ecall_pb2.GetQuoteResponse:
        """Quote over our own public keys and the host's nonce (the host chooses nothing else)."""
        self._ready()
        if len(request.nonce) != wire.REPORT_NONCE_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, f"nonce must be {wire.REPORT_NONCE_SIZE} bytes")
        runtime_data = self.public_keys().SerializeToString(deterministic=True)
        quote = self._quotes.quote(wire.report_data(runtime_data, request.nonce))
        return ecall_pb2.GetQuoteResponse(quote=quote, runtime_data=runtime_data)

    def issue_challenge(self, request: ecall_pb2.IssueChallengeRequest) -> ecall_pb2.IssueChallengeResponse:
        """A fresh challenge for one instance; it replaces any earlier one for that instance.

        With `reads`, the challenge is the read fence of a loaded instance: it closes the open
        read round, so the keyvault's statement for it is made after every read it covers.
        """
        self._ready()
        if not _INSTANCE_ID.match(request.instance_id):
            raise EnclaveError(INVALID_ARGUMENT, "invalid instance id")
        challenge = secrets.token_bytes(wire.HASH_SIZE)
        if request.reads:
            instance = self._instance(request.instance_id)
            for read in instance.reads:
                read.closed = True
            instance.read_challenge = challenge
            return ecall_pb2.IssueChallengeResponse(challenge=challenge)
        self._challenges.pop(request.instance_id, None)
        self._challenges[request.instance_id] = challenge
        while len(self._challenges) > MAX_CHALLENGES:
            del self._challenges[next(iter(self._challenges))]
        return ecall_pb2.IssueChallengeResponse(challenge=challenge)

    def provision_key(self, request: ecall_pb2.ProvisionKeyRequest) -> ecall_pb2.ProvisionKeyResponse:
        """Install an instance data key HPKE-wrapped to this enclave and signed by the keyvault."""
        hpke, _ = self._ready()
        if not _INSTANCE_ID.match(request.instance_id) or request.key_version < 1:
            raise EnclaveError(INVALID_ARGUMENT, "invalid instance id or key version")
        wrapped = request.wrapped_key
        if wrapped.suite != crypto.X25519_SUITE or len(wrapped.encapsulated_key) != _X25519_ENC_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "wrapped keys use the X25519 HPKE suite (32-byte enc)")
        key_name = wire.instance_key_name(request.instance_id)
        # HPKE base mode does not authenticate the sender and our HPKE key is public, so only
        # the pinned keyvault's signature (over name, version, recipient = us) proves the origin.
        signed = wire.wrapped_key_signing_bytes(
            key_name, request.key_version, hpke.x25519_public, wrapped.encapsulated_key, wrapped.ciphertext
        )
        if not wire.verify_ed25519(self._release_key, wrapped.signature, signed):
            raise EnclaveError(PERMISSION_DENIED, "wrapped key is not signed by the pinned keyvault")
        info = wire.key_release_info(key_name, request.key_version)
        try:
            key = hpke.open(wrapped.suite, wrapped.encapsulated_key, wrapped.ciphertext, info=info, aad=b"")
        except DecryptionError:
            raise EnclaveError(INVALID_ARGUMENT, "wrapped key: decryption failed") from None
        if len(key) != crypto.KEY_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "wrapped key is not a 32-byte key")
        if self._data_keys.get(request.instance_id, {}).get(request.key_version, key) != key:
            raise EnclaveError(ALREADY_EXISTS, "a different key is provisioned for this version")
        self._data_keys.setdefault(request.instance_id, {})[request.key_version] = key
        return ecall_pb2.ProvisionKeyResponse()

    def create_instance(self, request: ecall_pb2.CreateInstanceRequest) -> ecall_pb2.CreateInstanceResponse:
        """Start an instance the keyvault does not know; return its genesis entry, link, descriptor."""
        self._ready()
        instance_id = request.instance_id
        if not _INSTANCE_ID.match(instance_id):
            raise EnclaveError(
                INVALID_ARGUMENT, "instance id: lowercase letters, digits and dashes, at most 63"
            )
        if instance_id in self._instances:
            raise EnclaveError(ALREADY_EXISTS, "instance exists")
        if self._restoring is not None and self._restoring.instance_id == instance_id:
            raise EnclaveError(FAILED_PRECONDITION, "a restore of this instance is open")
        self._check_statement(instance_id, request.statement, request.host_time_unix_ms)
        if request.statement.head.sequence:
            # Creating it again here would fork the registered log (and its configuration).
            raise EnclaveError(ALREADY_EXISTS, "the keyvault holds this instance; restore it instead")
        config = envelope_pb2.InstanceConfig()
        config.CopyFrom(request.config)
        config.DiscardUnknownFields()  # the descriptor's bytes must say all the enclave enforces
        instance = Instance.create(instance_id, config)
        body = storage_pb2.EntryBody(genesis=storage_pb2.Genesis(config=config))
        entry = self._encrypt_entry(instance_id, 1, wire.ZERO_HASH, body)
        instance.sequence, instance.head_hash = 1, wire.entry_hash(entry)
        instance.genesis_hash = instance.head_hash
        link = self._link(instance, envelope_pb2.CommitHead())
        self._hold(instance)  # not live: even a fast instance answers nothing before registration
        self._instances[instance_id] = instance
        return ecall_pb2.CreateInstanceResponse(entry=entry, link=link)

    def execute_batch(self, request: ecall_pb2.ExecuteBatchRequest) -> ecall_pb2.ExecuteBatchResponse:
        """Run a batch of sealed commands: one outcome each, one log entry per accepted command."""
        instance = self._instance(request.instance_id)
        self._current_key(instance.instance_id)
        if len(instance.holds) >= MAX_HOLDS:
            raise EnclaveError(FAILED_PRECONDITION, "too many heads await keyvault confirmation")
        response = ecall_pb2.ExecuteBatchResponse()
        sequence, previous = instance.sequence, instance.head_hash
        limit = self._limit_for(instance)
        instance.store.begin()
        try:
            for sealed in request.commands:
                outcome, entry = self._execute_one(
                    instance,
                    sealed,
                    now_ms=request.host_time_unix_ms,
                    sequence=sequence + 1,
                    previous=previous,
                    limit=limit,
                )
                response.outcomes.append(outcome)
                if entry is not None:
                    sequence, previous = entry.sequence, wire.entry_hash(entry)
                    response.entries.append(entry)
        except BaseException:
            instance.store.rollback()
            raise
        instance.store.commit()
        base = instance.head()
        instance.sequence, instance.head_hash = sequence, previous
        if response.entries:
            response.link.CopyFrom(self._link(instance, base))
            self._hold(instance)
        if response.entries:
            response.held_until = self._wrap_held(instance, list(response.outcomes))
            if response.held_until:
                hold = instance.holds[-1]
                response.held_key_check, response.held_key_version = (
                    wire.hold_key_check(hold.key),
                    hold.key_version,
                )
        else:
            # Refusals only: they carry the account's counter state (its last answer), which a
            # boot left behind must not show. A hold's confirmation may predate this read, so
            # they wait for a read fence (a challenge issued after it), like query answers.
            response.read_round = self._wrap_read(instance, list(response.outcomes))
        return response

    def _execute_one(
        self,
        instance: Instance,
        sealed: envelope_pb2.SealedCommand,
        *,
        now_ms: int,
        sequence: int,
        previous: bytes,
        limit: int,
    ) -> tuple[envelope_pb2.CommandOutcome, envelope_pb2.LogEntry | None]:
        hpke, _ = self._ready()
        try:
            command = commands.open_command(hpke, instance.instance_id, sealed)
        except EnclaveError as refusal:
            return envelope_pb2.CommandOutcome(error=refusal.to_proto()), None
        command_hash = wire.command_hash(sealed.encapsulated_key, sealed.ciphertext)
        try:
            call = instance.parse_call(command.call, read_only=False)
            caller = instance.authorizer.authorize(command, now_ms)
            result, writes = instance.apply(
                caller, command.counter, call, limit, command_hash=command_hash, sequence=sequence
            )
        except EnclaveError as refusal:
            refused = command_pb2.CommandResult(error=refusal.to_proto(), may_run_later=refusal.may_run_later)
            if isinstance(refusal, CounterMismatch):
                refused.counter.CopyFrom(refusal.state)
                if refusal.state.last_command_hash:  # the receipt of the command that used it
                    refused.counter.last_receipt.CopyFrom(
                        self._receipt(
                            envelope_pb2.RECEIPT_KIND_COMMAND,
                            instance.instance_id,
                            refusal.state.last_sequence,
                            refusal.state.last_command_hash,
                            refusal.state.last_result,
                        )
                    )
            outcome = envelope_pb2.CommandOutcome(
                sealed_response=commands.seal_response(command, refused.SerializeToString(deterministic=True))
            )
            if refusal.code == RESOURCE_EXHAUSTED:  # the host must know: it is its budget
                outcome.error.CopyFrom(refusal.to_proto())
            return outcome, None
        executed = storage_pb2.ExecutedCommand(
            account=caller.account,
            signer_public_key=caller.signer_public_key,
            counter=command.counter,
            command_hash=command_hash,
            request_id=command.request_id,
            writes=writes,
        )
        if executed.ByteSize() > len(command.call) + LOGGED_WRITES_OVER_CALL:
            del executed.writes[:]
            executed.call = command.call
        entry = self._encrypt_entry(
            instance.instance_id, sequence, previous, storage_pb2.EntryBody(command=executed)
        )
        result_bytes = result.SerializeToString(deterministic=True)
        receipt = self._receipt(
            envelope_pb2.RECEIPT_KIND_COMMAND, instance.instance_id, sequence, command_hash, result_bytes
        )
        outcome = envelope_pb2.CommandOutcome(
            sealed_response=commands.seal_response(command, result_bytes, receipt),
            accepted=True,
            sequence=sequence,
        )
        return outcome, entry

    def query(self, request: ecall_pb2.QueryRequest) -> ecall_pb2.QueryResponse:
        """Run a read-only command; nothing is logged and the counter is not used."""
        instance = self._instance(request.instance_id)
        hpke, _ = self._ready()
        sealed = request.command
        try:
            command = commands.open_command(hpke, instance.instance_id, sealed)
            if command.counter:  # a command: refused unsealed, or its client would take it as final
                raise EnclaveError(INVALID_ARGUMENT, "a query carries counter 0; send commands with Execute")
        except EnclaveError as refusal:
            return ecall_pb2.QueryResponse(outcome=envelope_pb2.CommandOutcome(error=refusal.to_proto()))
        receipt = None
        try:
            call = instance.parse_call(command.call, read_only=True)
            caller = instance.authorizer.authorize(command, request.host_time_unix_ms)
            result = instance.query(caller, call)
            result.counter.CopyFrom(instance.counter_state(caller.account))
        except EnclaveError as refusal:
            result = command_pb2.CommandResult(error=refusal.to_proto(), may_run_later=refusal.may_run_later)
        else:
            command_hash = wire.command_hash(sealed.encapsulated_key, sealed.ciphertext)
            receipt = self._receipt(
                envelope_pb2.RECEIPT_KIND_QUERY,
                instance.instance_id,
                instance.sequence,
                command_hash,
                result.SerializeToString(deterministic=True),
            )
        sealed_response = commands.seal_response(
            command, result.SerializeToString(deterministic=True), receipt
        )
        outcome = envelope_pb2.CommandOutcome(sealed_response=sealed_response)
        return ecall_pb2.QueryResponse(outcome=outcome, read_round=self._wrap_read(instance, [outcome]))

    def snapshot(self, request: ecall_pb2.SnapshotRequest) -> ecall_pb2.SnapshotResponse:
        """The instance's whole state at its head, encrypted under its current key."""
        instance = self._instance(request.instance_id)
        version, key = self._current_key(instance.instance_id)
        aad = wire.snapshot_aad(instance.instance_id, instance.sequence, instance.head_hash, version)
        nonce, ciphertext = crypto.aead_seal(key, instance.snapshot_plaintext(), aad)
        return ecall_pb2.SnapshotResponse(
            snapshot=envelope_pb2.EncryptedSnapshot(
                instance_id=instance.instance_id,
                head=instance.head(),
                key_version=version,
                nonce=nonce,
                ciphertext=ciphertext,
            )
        )

    def restore(self, request: ecall_pb2.RestoreRequest) -> ecall_pb2.RestoreResponse:
        """Rebuild an instance from an optional snapshot and the log entries after it.

        Freshness is checked here, not by the host: the pinned keyvault must have stated its
        commit head K for this enclave and its current challenge, and the restored chain must
        contain K (sequence and hash) and the genesis the keyvault registered, else
        FAILED_PRECONDITION and nothing changes. K = 0: the keyvault never registered it. A
        loaded instance is never replaced: within one boot an instance only moves forward.
        A long log comes in parts (`more`, then `continues`): the instance being rebuilt is
        out of reach of every other call until the last part has passed the checks at the end.
        """
        self._ready()
        opened, self._restoring = self._restoring, None  # a refused part leaves nothing open
        if request.abandon:  # the host cannot send the rest: drop what the open restore holds
            if opened is not None and opened.instance_id != request.instance_id:
                self._restoring = opened  # another instance's: not this call's to drop
            return ecall_pb2.RestoreResponse()
        instance_id = request.instance_id
        if request.continues:
            if opened is None or opened.instance_id != instance_id:
                raise EnclaveError(FAILED_PRECONDITION, "no restore of this instance is open to continue")
            if request.HasField("snapshot") or request.HasField("statement"):
                raise EnclaveError(INVALID_ARGUMENT, "a restore's later parts carry entries only")
            rebuild, entries = opened, _parse_entries(request.entries)
        else:
            rebuild, entries = self._open_restore(request)
        limit = self._limit_for(None)  # whatever else is held (the restore is not, meanwhile)
        kv_head = rebuild.statement.head
        instance = rebuild.instance
        for entry in entries:
            instance = self._replay(instance_id, rebuild.chain, rebuild.ciphers, instance, entry, limit=limit)
            if instance.sequence == kv_head.sequence and instance.head_hash != kv_head.hash:
                raise _stale(f"log entry {entry.sequence} differs from the keyvault head (a fork)")
        if instance is not None and instance.store.size > limit:  # a snapshot too, kept open or not
            raise EnclaveError(RESOURCE_EXHAUSTED, "enclave memory budget exhausted")
        rebuild.instance = instance
        if request.more:
            self._restoring = rebuild
            return ecall_pb2.RestoreResponse(head=instance.head() if instance else None)
        return self._finish_restore(rebuild)

    def _open_restore(
        self, request: ecall_pb2.RestoreRequest
    ) -> tuple[_OpenRestore, Iterator[envelope_pb2.LogEntry]]:
        """A restore's first part: the statement checked, the snapshot loaded and bridged."""
        instance_id = request.instance_id
        if instance_id in self._instances:
            raise _loaded_already()
        self._check_statement(instance_id, request.statement, request.host_time_unix_ms)
        instance = None
        entries = _parse_entries(request.entries)
        if request.HasField("snapshot"):
            if request.snapshot.instance_id != instance_id:
                raise EnclaveError(INVALID_ARGUMENT, "snapshot is for another instance")
            instance = self._load_snapshot(request.snapshot)
            entries = self._bridge(instance, request.statement.head, entries)
        # The instance's encodings and each key's cipher are set up once per restore.
        rebuild = _OpenRestore(instance_id, request.statement, wire.EntryChain(instance_id), {}, instance)
        return rebuild, entries

    def _finish_restore(self, rebuild: _OpenRestore) -> ecall_pb2.RestoreResponse:
        """The checks at the end of a restore; the instance loads only if all of them pass."""
        instance_id, instance, statement = rebuild.instance_id, rebuild.instance, rebuild.statement
        kv_head = statement.head
        if instance is None:
            raise EnclaveError(INVALID_ARGUMENT, "nothing to restore: no snapshot and no genesis entry")
        if instance.sequence < kv_head.sequence:
            raise _stale(f"the log ends at {instance.sequence}, before the keyvault head {kv_head.sequence}")
        if kv_head.sequence and (
            instance.genesis_hash != statement.genesis_hash
            or wire.config_hash(instance.config_bytes) != statement.config_hash
        ):
            raise _stale("the log's genesis is not the one the keyvault registered (a fork)")
        instance.confirmed = envelope_pb2.CommitHead(
            sequence=kv_head.sequence, hash=kv_head.hash or wire.ZERO_HASH
        )
        # Live at once only when the keyvault stated this very head for this boot; otherwise
        # (entries it has not seen, or an instance it never registered) only once it confirms.
        instance.live = bool(kv_head.sequence) and instance.sequence == kv_head.sequence
        response = ecall_pb2.RestoreResponse(head=instance.head())
        if not instance.live:
            response.link.CopyFrom(self._link(instance, instance.confirmed))
            self._hold(instance)
        self._instances[instance_id] = instance
        if instance.live:
            response.descriptor.CopyFrom(self._descriptor(instance))
        return response

    def confirm_head(self, request: ecall_pb2.ConfirmHeadRequest) -> ecall_pb2.ConfirmHeadResponse:
        """Take the keyvault's word on a head for this boot; release what it covers.

        A `confirmation` (AdvanceCommitHead's answer) releases the answers held until heads up
        to it. A `statement` for the instance's read challenge is a read fence: made after the
        reads it closed, it releases those whose head it covers, and confirms that head too. A
        head that is not on this boot's chain means another boot moved on: refused.
        """
        _, signing_key = self._ready()
        own_key = signing_key.public_key().public_bytes_raw()
        if request.HasField("statement"):
            return self._read_fence(request.statement, own_key)
        confirmation = request.confirmation
        instance = self._instance(confirmation.instance_id)
        head = confirmation.head
        if len(head.hash) != wire.HASH_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "confirmation hash must be 32 bytes")
        message = wire.head_confirmation_bytes(instance.instance_id, head.sequence, head.hash, own_key)
        if confirmation.enclave_signing_public_key != own_key or not wire.verify_ed25519(
            self._release_key, confirmation.signature, message
        ):
            raise EnclaveError(
                PERMISSION_DENIED, "not a confirmation by the pinned keyvault for this enclave"
            )
        response = ecall_pb2.ConfirmHeadResponse()
        self._confirm(instance, head, response)
        return response

    def _read_fence(
        self, statement: envelope_pb2.HeadStatement, own_key: bytes
    ) -> ecall_pb2.ConfirmHeadResponse:
        instance = self._instance(statement.instance_id)
        challenge, instance.read_challenge = instance.read_challenge, b""  # used up either way
        self._check_shape(statement)
        head = statement.head
        if not challenge or not hmac.compare_digest(statement.challenge, challenge):
            raise _stale("the statement does not answer this instance's read challenge")
        if statement.enclave_signing_public_key != own_key or not wire.verify_ed25519(
            self._release_key, statement.signature, wire.head_statement_bytes(statement)
        ):
            raise EnclaveError(PERMISSION_DENIED, "not a statement by the pinned keyvault for this enclave")
        response = ecall_pb2.ConfirmHeadResponse()
        if head.sequence:
            if (statement.genesis_hash, statement.config_hash) != (
                instance.genesis_hash,
                wire.config_hash(instance.config_bytes),
            ):
                raise _stale("the keyvault holds another instance under this id (a fork)")
            self._confirm(instance, head, response)
            covered = [r for r in instance.reads if r.closed and r.sequence <= head.sequence]
            instance.reads = [r for r in instance.reads if r not in covered]
            response.released.extend(ecall_pb2.ReleasedHold(read_round=r.number, key=r.key) for r in covered)
        response.reads_waiting = sum(1 for r in instance.reads if r.closed)
        return response

    def _confirm(
        self, instance: Instance, head: envelope_pb2.CommitHead, response: ecall_pb2.ConfirmHeadResponse
    ) -> None:
        """The keyvault holds `head`: it must be on this boot's chain; release the holds it covers."""
        on_chain = (
            (head.sequence, head.hash) == (instance.sequence, instance.head_hash)
            or (head.sequence, head.hash) == (instance.confirmed.sequence, instance.confirmed.hash)
            or any((h.sequence, h.hash) == (head.sequence, head.hash) for h in instance.holds)
            # A fast instance takes no holds once live: the heads it made since cannot be told apart.
            or (not instance.holding and head.sequence < instance.sequence)
        )
        if not on_chain:
            raise _stale("the keyvault holds a head not on this enclave's chain (a fork, or a stale boot)")
        if head.sequence < instance.confirmed.sequence:
            return  # an older confirmation: nothing new
        released = [hold for hold in instance.holds if hold.sequence <= head.sequence]
        instance.holds = instance.holds[len(released) :]
        instance.confirmed = envelope_pb2.CommitHead(sequence=head.sequence, hash=head.hash)
        response.released.extend(ecall_pb2.ReleasedHold(held_until=h.sequence, key=h.key) for h in released)
        if not instance.live:
            instance.live = True
            response.descriptor.CopyFrom(self._descriptor(instance))

    @staticmethod
    def _bridge(
        instance: Instance, kv_head: envelope_pb2.CommitHead, entries: Iterator[envelope_pb2.LogEntry]
    ) -> Iterator[envelope_pb2.LogEntry]:
        """Check the snapshot against K; entries from K up to a snapshot beyond K must hash-chain."""
        if kv_head.sequence == 0 or kv_head.sequence > instance.sequence:
            return entries  # replay checks K
        if kv_head.sequence == instance.sequence:
            if instance.head_hash != kv_head.hash:
                raise _stale(f"the snapshot at {instance.sequence} differs from the keyvault head (a fork)")
            return entries
        count = instance.sequence - kv_head.sequence + 1  # entries K..S, only hashed
        # At most `count` (zip asks the range first, so no entry is taken past them): the rest
        # of `entries` is what follows the bridge.
        bridge = [entry for _, entry in zip(range(count), entries, strict=False)]
        digest = kv_head.hash
        for offset, entry in enumerate(bridge):
            sequence = kv_head.sequence + offset
            if entry.instance_id != instance.instance_id or entry.sequence != sequence:
                break
            if len(entry.previous_hash) != wire.HASH_SIZE or len(entry.nonce) != crypto.NONCE_SIZE:
                break  # not an entry this enclave wrote: nothing to hash
            if offset and entry.previous_hash != digest:
                break
            digest = wire.entry_hash(entry)
            if offset == 0 and digest != kv_head.hash:
                break
        else:
            if len(bridge) == count and digest == instance.head_hash:
                return entries
        raise _stale(f"the snapshot at {instance.sequence} does not chain to the keyvault head")

    def _load_snapshot(self, snapshot: envelope_pb2.EncryptedSnapshot) -> Instance:
        key = self._key(snapshot.instance_id, snapshot.key_version)
        if len(snapshot.head.hash) != wire.HASH_SIZE:
            raise _data_loss("snapshot")
        aad = wire.snapshot_aad(
            snapshot.instance_id, snapshot.head.sequence, snapshot.head.hash, snapshot.key_version
        )
        try:
            plain = storage_pb2.InstanceSnapshot.FromString(
                crypto.aead_open(key, snapshot.nonce, snapshot.ciphertext, aad)
            )
        except (DecryptionError, DecodeError):
            raise _data_loss("snapshot") from None
        if plain.instance_id != snapshot.instance_id:
            raise _data_loss("snapshot")
        if len(plain.genesis_hash) != wire.HASH_SIZE:
            raise _data_loss("snapshot")
        store = Store((tuple(entry.key), entry.value) for entry in plain.entries)
        instance = Instance.create(plain.instance_id, plain.config, store)
        instance.sequence, instance.head_hash = snapshot.head.sequence, snapshot.head.hash
        instance.genesis_hash = plain.genesis_hash
        return instance

    def _replay(
        self,
        instance_id: str,
        chain: wire.EntryChain,
        ciphers: dict[int, crypto.AeadKey],
        instance: Instance | None,
        entry: envelope_pb2.LogEntry,
        *,
        limit: int,
    ) -> Instance:
        sequence, key_version, previous = entry.sequence, entry.key_version, entry.previous_hash
        expected = instance.sequence + 1 if instance else 1
        if (
            entry.instance_id != instance_id
            or sequence != expected
            or previous != (instance.head_hash if instance else wire.ZERO_HASH)
        ):
            raise EnclaveError(DATA_LOSS, f"log entry {sequence} does not continue the chain at {expected}")
        nonce, ciphertext = entry.nonce, entry.ciphertext
        try:
            place = wire.entry_place(sequence, key_version, previous)  # for its aad and its hash
            aad = chain.aad(place)
            if key_version not in ciphers:
                ciphers[key_version] = crypto.AeadKey(self._key(instance_id, key_version))
            plain = ciphers[key_version].open(nonce, ciphertext, aad)
            body = storage_pb2.EntryBody.FromString(plain)
        except (DecryptionError, DecodeError):
            raise _data_loss(f"log entry {sequence}") from None
        genesis = instance is None  # only a genesis entry starts a log
        # Logged writes first (most entries): an unset oneof member reads as empty, so writes
        # are there only in a command body, and WhichOneof is asked only of the rest.
        if (writes := body.command.writes) and instance is not None:
            instance.apply_writes(writes, limit)  # what the command wrote, not a re-run
        elif (kind := body.WhichOneof("body")) == "genesis" and instance is None:
            instance = Instance.create(instance_id, body.genesis.config)
        elif kind == "command" and instance is not None:  # an entry that logged its call, not its writes
            executed = body.command
            caller = Caller(account=executed.account, signer_public_key=executed.signer_public_key)
            try:
                call = instance.parse_call(executed.call, read_only=False)
                instance.apply(
                    caller,
                    executed.counter,
                    call,
                    limit,
                    command_hash=executed.command_hash,
                    sequence=sequence,
                )
            except EnclaveError as refusal:
                if refusal.code == RESOURCE_EXHAUSTED:
                    raise
                raise EnclaveError(DATA_LOSS, f"log entry {sequence} does not replay") from None
        else:
            raise EnclaveError(DATA_LOSS, f"log entry {sequence} is out of place")
        instance.sequence = sequence
        instance.head_hash = chain.hash(place, nonce, ciphertext)
        if genesis:
            instance.genesis_hash = instance.head_hash
        return instance

    def seal(self, request: ecall_pb2.SealRequest) -> ecall_pb2.SealResponse:
        """Seal every provisioned data key to this platform and measurement."""
        self._ready()
        keys = storage_pb2.SealedKeys()
        for instance_id in sorted(self._data_keys):
            for version, key in sorted(self._data_keys[instance_id].items()):
                keys.keys.add(instance_id=instance_id, key_version=version, key=key)
        # The aad binds the pinned keyvault: an enclave pinned to another key (say, the host's)
        # cannot seal keys that this one would then unseal.
        blob = self._sealing.seal(
            keys.SerializeToString(deterministic=True), wire.sealed_keys_aad(self._release_key)
        )
        return ecall_pb2.SealResponse(sealed_blob=blob)

    def unseal(self, request: ecall_pb2.UnsealRequest) -> ecall_pb2.UnsealResponse:
        """Load data keys sealed earlier on this platform by this measurement."""
        self._ready()
        try:
            keys = storage_pb2.SealedKeys.FromString(
                self._sealing.unseal(request.sealed_blob, wire.sealed_keys_aad(self._release_key))
            )
        except (DecryptionError, DecodeError):
            raise _data_loss("sealed blob") from None
        for sealed in keys.keys:
            if self._data_keys.get(sealed.instance_id, {}).get(sealed.key_version, sealed.key) != sealed.key:
                raise EnclaveError(ALREADY_EXISTS, "a different key is provisioned for a sealed version")
        for sealed in keys.keys:
            self._data_keys.setdefault(sealed.instance_id, {})[sealed.key_version] = sealed.key
        return ecall_pb2.UnsealResponse(instance_ids=sorted({k.instance_id for k in keys.keys}))

    def get_status(self, request: ecall_pb2.GetStatusRequest) -> ecall_pb2.GetStatusResponse:
        """Measurement, memory use and budget, loaded instances and their heads."""
        return ecall_pb2.GetStatusResponse(
            mrenclave=self.mrenclave,
            memory_used_bytes=self.memory_used(),
            memory_budget_bytes=self._budget,
            instances=[
                ecall_pb2.InstanceHead(instance_id=iid, head=i.head(), confirmed=i.confirmed)
                for iid, i in sorted(self._instances.items())
            ],
        )

    def state_digest(self) -> bytes:
        """A hash over all instances and keys: equal digests mean nothing changed (for tests)."""
        digest = hashlib.sha256()
        for instance_id in sorted(self._instances):
            digest.update(instance_id.encode() + self._instances[instance_id].digest())
        for instance_id in sorted(self._data_keys):
            for version, key in sorted(self._data_keys[instance_id].items()):
                digest.update(f"{instance_id}/{version}".encode() + key)
        return digest.digest()
