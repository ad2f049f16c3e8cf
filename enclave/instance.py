"""One app instance inside the enclave: configuration, state, head, and command execution.

`apply` is the whole state transition of one authorized command: check and advance the
caller's counter (noting which command consumed it, so a client can tell its own command from
another), run the app in a nested transaction (an app refusal keeps only the counter advance,
so a refused command can never be replayed later), then check the memory budget before
committing. It returns the writes it made; restore applies them again (`apply_writes`), or
runs `apply` again for an entry that logged its call instead.

Besides its state an instance knows its genesis (which the keyvault registers), the newest
head the keyvault confirmed, whether the keyvault has vouched for it to this boot at all
(`live`), the keys of answers held until the keyvault confirms the heads they depend on
(`holds`, oldest first), and the read rounds of queries held until a read fence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from veil.enclave import wire
from veil.enclave.apps import APPS, App
from veil.enclave.apps.base import CallContext
from veil.enclave.auth import Authorizer, Caller, make_authorizer
from veil.enclave.errors import ABORTED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, EnclaveError
from veil.enclave.store import Store
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2, storage_pb2


def _counter_key(account: str) -> tuple[str, ...]:
    return ("counter", account)


class CounterMismatch(EnclaveError):
    """A command's counter is not the account's next one; carries the account's counter state."""

    def __init__(self, state: command_pb2.CounterState, counter: int) -> None:
        # Above the next counter, the command may still run once the counters before it are used.
        ahead = counter > state.next_counter
        super().__init__(ABORTED, f"counter must be {state.next_counter}", may_run_later=ahead)
        self.state = state


@dataclass(frozen=True)
class Hold:
    """Answers held until the keyvault confirms head (sequence, hash), and the key that opens them."""

    sequence: int
    hash: bytes
    key: bytes
    key_version: int = 0  # of the data key its key derives from (wire.hold_root)


@dataclass
class ReadRound:
    """Query answers held until a keyvault statement, asked for after they were read, covers
    `sequence` (the newest head they read): a read fence."""

    number: int
    sequence: int
    key: bytes
    closed: bool = False


@dataclass
class Instance:
    """A loaded instance. `sequence`/`head_hash` name its last log entry."""

    instance_id: str
    config: envelope_pb2.InstanceConfig
    app: App
    authorizer: Authorizer
    store: Store = field(default_factory=Store)
    sequence: int = 0
    head_hash: bytes = wire.ZERO_HASH
    genesis_hash: bytes = wire.ZERO_HASH
    confirmed: envelope_pb2.CommitHead = field(default_factory=envelope_pb2.CommitHead)
    holds: list[Hold] = field(default_factory=list)
    live: bool = False  # the keyvault vouched for this instance to this boot
    reads: list[ReadRound] = field(default_factory=list)
    read_challenge: bytes = b""
    read_rounds: int = 0  # rounds opened so far: numbers are never reused within a boot

    @classmethod
    def create(
        cls, instance_id: str, config: envelope_pb2.InstanceConfig, store: Store | None = None
    ) -> Instance:
        """Build an instance, refusing (INVALID_ARGUMENT) a configuration it cannot run."""
        app = APPS.get(config.app)
        if app is None:
            raise EnclaveError(INVALID_ARGUMENT, "unknown app")
        authorizer = make_authorizer(config)
        app.validate_config(config)
        return cls(instance_id, config, app, authorizer, store or Store())

    def head(self) -> envelope_pb2.CommitHead:
        """The current commit head."""
        return envelope_pb2.CommitHead(sequence=self.sequence, hash=self.head_hash)

    @property
    def strict(self) -> bool:
        """Whether answers wait for the keyvault to confirm the head they depend on."""
        return self.config.acknowledgment != envelope_pb2.ACKNOWLEDGMENT_FAST

    @property
    def holding(self) -> bool:
        """Whether answers are held: always when strict, and for any instance until it is live."""
        return self.strict or not self.live

    @property
    def config_bytes(self) -> bytes:
        """The configuration as the descriptor and the keyvault name it (deterministic bytes)."""
        return self.config.SerializeToString(deterministic=True)

    def parse_call(self, call: bytes, *, read_only: bool) -> apps_pb2.AppCall:
        """Decode a command's call and check it names a method of this instance's app."""
        try:
            parsed = apps_pb2.AppCall.FromString(call)
        except DecodeError:
            raise EnclaveError(INVALID_ARGUMENT, "call is not a valid AppCall") from None
        method = self.app.method_of(parsed)
        if read_only and method not in self.app.read_only:
            raise EnclaveError(INVALID_ARGUMENT, "not a read-only method; send it as a command")
        return parsed

    def counter_state(self, account: str, *, with_result: bool = False) -> command_pb2.CounterState:
        """The account's next counter and the command that consumed the last one (its answer too)."""
        raw = self.store.get(_counter_key(account))
        last = storage_pb2.AccountCounter.FromString(raw) if raw is not None else storage_pb2.AccountCounter()
        state = command_pb2.CounterState(
            next_counter=last.counter + 1, last_command_hash=last.command_hash, last_sequence=last.sequence
        )
        if with_result:
            state.last_result = last.result
        return state

    def apply(
        self,
        caller: Caller,
        counter: int,
        call: apps_pb2.AppCall,
        limit: int,
        *,
        command_hash: bytes,
        sequence: int,
    ) -> tuple[command_pb2.CommandResult, list[storage_pb2.StoreEntry]]:
        """Run one authorized command: its result and the writes it made (for its log entry).
        Raises EnclaveError (nothing changed) to refuse it."""
        store = self.store
        store.begin()
        try:
            state = self.counter_state(caller.account, with_result=True)
            if counter != state.next_counter:
                raise CounterMismatch(state, counter)
            result = self._run(caller, call)
            # Kept with the counter, so a client whose answer was lost can be given it again.
            consumed = storage_pb2.AccountCounter(
                counter=counter,
                command_hash=command_hash,
                sequence=sequence,
                result=result.SerializeToString(deterministic=True),
            )
            store.put(_counter_key(caller.account), consumed.SerializeToString(deterministic=True))
            if store.size > limit:  # the host sets the budget: a larger one may accept it
                raise EnclaveError(RESOURCE_EXHAUSTED, "enclave memory budget exhausted", may_run_later=True)
            writes = [
                storage_pb2.StoreEntry(key=key, value=value or b"", erased=value is None)
                for key, value in store.pending()
            ]
        except BaseException:
            store.rollback()
            raise
        store.commit()
        return result, writes

    def apply_writes(self, writes: Iterable[storage_pb2.StoreEntry], limit: int) -> None:
        """Apply a logged command's writes again (restore, which drops the instance on a refusal)."""
        # Entries this enclave wrote: an erasure has an empty value (never a value and `erased`),
        # so `erased` is read only for an empty value (each field read costs).
        self.store.apply(
            (tuple(write.key[:]), write.value or (None if write.erased else b"")) for write in writes
        )
        if self.store.size > limit:
            raise EnclaveError(RESOURCE_EXHAUSTED, "enclave memory budget exhausted")

    def query(self, caller: Caller, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        """Run a read-only call; every write is discarded."""
        self.store.begin()
        try:
            return self._run(caller, call)
        finally:
            self.store.rollback()

    def _run(self, caller: Caller, call: apps_pb2.AppCall) -> command_pb2.CommandResult:
        self.store.begin()
        try:
            result = self.app.execute(CallContext(self.store, caller, self.config), call)
        except EnclaveError as refusal:
            self.store.rollback()
            return command_pb2.CommandResult(error=refusal.to_proto())
        except BaseException:
            self.store.rollback()
            raise
        self.store.commit()
        return command_pb2.CommandResult(result=result)

    def snapshot_plaintext(self) -> bytes:
        """The deterministic serialization of the whole instance state."""
        snapshot = storage_pb2.InstanceSnapshot(
            instance_id=self.instance_id, config=self.config, genesis_hash=self.genesis_hash
        )
        for key, value in self.store.items():
            snapshot.entries.add(key=key, value=value)
        return snapshot.SerializeToString(deterministic=True)

    def digest(self) -> bytes:
        """A hash of the instance's state and head (for tests and diagnostics)."""
        held = b"".join(hold.sequence.to_bytes(8, "big") for hold in self.holds)
        return hashlib.sha256(
            self.snapshot_plaintext()
            + self.sequence.to_bytes(8, "big")
            + self.head_hash
            + self.confirmed.SerializeToString(deterministic=True)
            + held
        ).digest()
