"""The enclave runtime: its keys, its instances and the implementation of every ECALL.

Each method takes and returns the ECALL's protobuf messages and either succeeds or raises
`EnclaveError` having changed nothing: all checks come first, and a batch runs inside a store
transaction that is rolled back if anything unexpected happens.
"""

from __future__ import annotations

import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError
from veil.enclave.v1 import command_pb2, ecall_pb2, envelope_pb2, storage_pb2

from enclave import commands, crypto, wire
from enclave.auth import Caller
from enclave.errors import (
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
from enclave.instance import Instance
from enclave.providers import REPORT_DATA_SIZE, QuoteProvider, SealingProvider
from enclave.store import Store

DEFAULT_MEMORY_BUDGET = 96 * 1024 * 1024
_INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z: "$" also matches before a final "\n"
_ED25519_KEY_SIZE = 32
_X25519_ENC_SIZE = 32


def _data_loss(what: str) -> EnclaveError:
    return EnclaveError(DATA_LOSS, f"{what}: decryption failed")


def _stale(what: str) -> EnclaveError:
    return EnclaveError(FAILED_PRECONDITION, f"rollback refused: {what}")


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
        """Bytes of state held for all instances."""
        return sum(instance.store.size for instance in self._instances.values())

    def _limit_for(self, instance_id: str) -> int:
        """The size `instance_id`'s state may reach within the budget."""
        others = sum(i.store.size for iid, i in self._instances.items() if iid != instance_id)
        return self._budget - others

    def _sign_head(self, instance_id: str, sequence: int, head_hash: bytes) -> envelope_pb2.SignedCommitHead:
        _, signing_key = self._ready()
        signature = signing_key.sign(wire.commit_head_signing_bytes(instance_id, sequence, head_hash))
        head = envelope_pb2.CommitHead(sequence=sequence, hash=head_hash)
        return envelope_pb2.SignedCommitHead(instance_id=instance_id, head=head, signature=signature)

    def _receipt(
        self,
        kind: envelope_pb2.ReceiptKind.ValueType,
        instance_id: str,
        sequence: int,
        command_hash: bytes,
        result: bytes,
    ) -> envelope_pb2.Receipt:
        _, signing_key = self._ready()
        result_hash = hashlib.sha256(result).digest()
        message = wire.receipt_signing_bytes(
            kind=kind,
            instance_id=instance_id,
            sequence=sequence,
            command_hash=command_hash,
            result_hash=result_hash,
        )
        return envelope_pb2.Receipt(
            kind=kind,
            instance_id=instance_id,
            sequence=sequence,
            command_hash=command_hash,
            result_hash=result_hash,
            signature=signing_key.sign(message),
        )

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
        """Quote over caller-chosen report data (at most 64 bytes, zero padded)."""
        self._ready()
        if len(request.report_data) > REPORT_DATA_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "report_data is at most 64 bytes")
        report_data = request.report_data.ljust(REPORT_DATA_SIZE, b"\0")
        return ecall_pb2.GetQuoteResponse(quote=self._quotes.quote(report_data))

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
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self._release_key).verify(wrapped.signature, signed)
        except InvalidSignature:
            raise EnclaveError(
                PERMISSION_DENIED, "wrapped key is not signed by the pinned keyvault"
            ) from None
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
        """Start an instance and return its genesis entry and signed head."""
        self._ready()
        instance_id = request.instance_id
        if not _INSTANCE_ID.match(instance_id):
            raise EnclaveError(
                INVALID_ARGUMENT, "instance id: lowercase letters, digits and dashes, at most 63"
            )
        if instance_id in self._instances:
            raise EnclaveError(ALREADY_EXISTS, "instance exists")
        instance = Instance.create(instance_id, request.config)
        body = storage_pb2.EntryBody(genesis=storage_pb2.Genesis(config=request.config))
        entry = self._encrypt_entry(instance_id, 1, wire.ZERO_HASH, body)
        instance.sequence, instance.head_hash = 1, wire.entry_hash(entry)
        self._instances[instance_id] = instance
        return ecall_pb2.CreateInstanceResponse(
            entry=entry, head=self._sign_head(instance_id, 1, instance.head_hash)
        )

    def execute_batch(self, request: ecall_pb2.ExecuteBatchRequest) -> ecall_pb2.ExecuteBatchResponse:
        """Run a batch of sealed commands: one outcome each, one log entry per accepted command."""
        instance = self._instance(request.instance_id)
        self._current_key(instance.instance_id)
        response = ecall_pb2.ExecuteBatchResponse()
        sequence, previous = instance.sequence, instance.head_hash
        limit = self._limit_for(instance.instance_id)
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
            if response.entries:
                response.head.CopyFrom(self._sign_head(instance.instance_id, sequence, previous))
        except BaseException:
            instance.store.rollback()
            raise
        instance.store.commit()
        instance.sequence, instance.head_hash = sequence, previous
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
        try:
            call = instance.parse_call(command.call, read_only=False)
            caller = instance.authorizer.authorize(command, now_ms)
            result = instance.apply(caller, command.counter, call, limit)
        except EnclaveError as refusal:
            refused = command_pb2.CommandResult(error=refusal.to_proto())
            outcome = envelope_pb2.CommandOutcome(
                sealed_response=commands.seal_response(command, refused.SerializeToString(deterministic=True))
            )
            if refusal.code == RESOURCE_EXHAUSTED:  # the host must know: it is its budget
                outcome.error.CopyFrom(refusal.to_proto())
            return outcome, None
        command_hash = wire.command_hash(sealed.encapsulated_key, sealed.ciphertext)
        executed = storage_pb2.ExecutedCommand(
            account=caller.account,
            signer_public_key=caller.signer_public_key,
            counter=command.counter,
            call=command.call,
            command_hash=command_hash,
            request_id=command.request_id,
        )
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
        except EnclaveError as refusal:
            return ecall_pb2.QueryResponse(outcome=envelope_pb2.CommandOutcome(error=refusal.to_proto()))
        receipt = None
        try:
            call = instance.parse_call(command.call, read_only=True)
            caller = instance.authorizer.authorize(command, request.host_time_unix_ms)
            result = instance.query(caller, call)
        except EnclaveError as refusal:
            result = command_pb2.CommandResult(error=refusal.to_proto())
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
        return ecall_pb2.QueryResponse(outcome=envelope_pb2.CommandOutcome(sealed_response=sealed_response))

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

        Freshness is checked here, not by the host: the pinned keyvault must have signed its
        commit head K for this enclave's signing key, and the restored chain must contain K
        (sequence and hash), else FAILED_PRECONDITION and nothing changes. K = 0: no head yet.
        """
        _, signing_key = self._ready()
        instance_id = request.instance_id
        kv_head = request.keyvault_head
        self._check_head_statement(instance_id, kv_head, request.keyvault_head_signature, signing_key)
        instance = None
        entries = list(request.entries)
        if request.HasField("snapshot"):
            if request.snapshot.instance_id != instance_id:
                raise EnclaveError(INVALID_ARGUMENT, "snapshot is for another instance")
            instance = self._load_snapshot(request.snapshot)
            entries = self._bridge(instance, kv_head, entries)
        limit = self._limit_for(instance_id)
        for entry in entries:
            instance = self._replay(instance_id, instance, entry, limit)
            if instance.sequence == kv_head.sequence and instance.head_hash != kv_head.hash:
                raise _stale(f"log entry {entry.sequence} differs from the keyvault head (a fork)")
        if instance is None:
            raise EnclaveError(INVALID_ARGUMENT, "nothing to restore: no snapshot and no genesis entry")
        if instance.sequence < kv_head.sequence:
            raise _stale(f"the log ends at {instance.sequence}, before the keyvault head {kv_head.sequence}")
        if instance.store.size > limit:
            raise EnclaveError(RESOURCE_EXHAUSTED, "enclave memory budget exhausted")
        self._instances[instance_id] = instance
        return ecall_pb2.RestoreResponse(head=instance.head())

    def _check_head_statement(
        self,
        instance_id: str,
        head: envelope_pb2.CommitHead,
        signature: bytes,
        signing_key: ed25519.Ed25519PrivateKey,
    ) -> None:
        if head.sequence and len(head.hash) != wire.HASH_SIZE:
            raise EnclaveError(INVALID_ARGUMENT, "keyvault_head.hash must be 32 bytes")
        own_key = signing_key.public_key().public_bytes_raw()
        signed = wire.head_freshness_bytes(instance_id, head.sequence, head.hash, own_key)
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self._release_key).verify(signature, signed)
        except InvalidSignature:
            raise _stale("keyvault_head is not signed by the pinned keyvault for this enclave") from None

    @staticmethod
    def _bridge(
        instance: Instance, kv_head: envelope_pb2.CommitHead, entries: list[envelope_pb2.LogEntry]
    ) -> list[envelope_pb2.LogEntry]:
        """Check the snapshot against K; entries from K up to a snapshot beyond K must hash-chain."""
        if kv_head.sequence == 0 or kv_head.sequence > instance.sequence:
            return entries  # replay checks K
        if kv_head.sequence == instance.sequence:
            if instance.head_hash != kv_head.hash:
                raise _stale(f"the snapshot at {instance.sequence} differs from the keyvault head (a fork)")
            return entries
        count = instance.sequence - kv_head.sequence + 1  # entries K..S, only hashed
        bridge, rest = entries[:count], entries[count:]
        digest = kv_head.hash
        for offset, entry in enumerate(bridge):
            sequence = kv_head.sequence + offset
            if entry.instance_id != instance.instance_id or entry.sequence != sequence:
                break
            if offset and entry.previous_hash != digest:
                break
            digest = wire.entry_hash(entry)
            if offset == 0 and digest != kv_head.hash:
                break
        else:
            if len(bridge) == count and digest == instance.head_hash:
                return rest
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
        store = Store((tuple(entry.key), entry.value) for entry in plain.entries)
        instance = Instance.create(plain.instance_id, plain.config, store)
        instance.sequence, instance.head_hash = snapshot.head.sequence, snapshot.head.hash
        return instance

    def _replay(
        self, instance_id: str, instance: Instance | None, entry: envelope_pb2.LogEntry, limit: int
    ) -> Instance:
        sequence = instance.sequence + 1 if instance else 1
        previous = instance.head_hash if instance else wire.ZERO_HASH
        if entry.instance_id != instance_id or entry.sequence != sequence or entry.previous_hash != previous:
            raise EnclaveError(
                DATA_LOSS, f"log entry {entry.sequence} does not continue the chain at {sequence}"
            )
        key = self._key(instance_id, entry.key_version)
        aad = wire.entry_aad(instance_id, entry.sequence, entry.key_version, entry.previous_hash)
        try:
            body = storage_pb2.EntryBody.FromString(crypto.aead_open(key, entry.nonce, entry.ciphertext, aad))
        except (DecryptionError, DecodeError):
            raise _data_loss(f"log entry {entry.sequence}") from None
        kind = body.WhichOneof("body")
        if kind == "genesis" and instance is None:
            instance = Instance.create(instance_id, body.genesis.config)
        elif kind == "command" and instance is not None:
            executed = body.command
            caller = Caller(account=executed.account, signer_public_key=executed.signer_public_key)
            try:
                call = instance.parse_call(executed.call, read_only=False)
                instance.apply(caller, executed.counter, call, limit)
            except EnclaveError as refusal:
                if refusal.code == RESOURCE_EXHAUSTED:
                    raise
                raise EnclaveError(DATA_LOSS, f"log entry {entry.sequence} does not replay") from None
        else:
            raise EnclaveError(DATA_LOSS, f"log entry {entry.sequence} is out of place")
        instance.sequence, instance.head_hash = entry.sequence, wire.entry_hash(entry)
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
                ecall_pb2.InstanceHead(instance_id=iid, head=self._instances[iid].head())
                for iid in sorted(self._instances)
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
