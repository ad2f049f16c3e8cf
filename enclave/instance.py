"""One app instance inside the enclave: configuration, state, head, and command execution.

`apply` is the whole state transition of one authorized command, shared by live execution
and log replay so both produce the same state: check and advance the caller's counter, run
the app in a nested transaction (an app refusal keeps only the counter advance, so a refused
command can never be replayed later), then check the memory budget before committing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2, storage_pb2

from enclave import wire
from enclave.apps import APPS, App
from enclave.apps.base import CallContext
from enclave.auth import Authorizer, Caller, make_authorizer
from enclave.errors import ABORTED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, EnclaveError
from enclave.store import Store


def _counter_key(account: str) -> tuple[str, ...]:
    return ("counter", account)


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

    def counter(self, account: str) -> int:
        """The account's last accepted counter (0 before its first command)."""
        raw = self.store.get(_counter_key(account))
        return 0 if raw is None else int.from_bytes(raw, "big")

    def apply(
        self, caller: Caller, counter: int, call: apps_pb2.AppCall, limit: int
    ) -> command_pb2.CommandResult:
        """Run one authorized command; raises EnclaveError (nothing changed) to refuse it."""
        store = self.store
        store.begin()
        try:
            expected = self.counter(caller.account) + 1
            if counter != expected:
                raise EnclaveError(ABORTED, f"counter must be {expected}")
            store.put(_counter_key(caller.account), counter.to_bytes(8, "big"))
            result = self._run(caller, call)
            if store.size > limit:
                raise EnclaveError(RESOURCE_EXHAUSTED, "enclave memory budget exhausted")
        except BaseException:
            store.rollback()
            raise
        store.commit()
        return result

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
        snapshot = storage_pb2.InstanceSnapshot(instance_id=self.instance_id, config=self.config)
        for key, value in self.store.items():
            snapshot.entries.add(key=key, value=value)
        return snapshot.SerializeToString(deterministic=True)

    def digest(self) -> bytes:
        """A hash of the instance's state and head (for tests and diagnostics)."""
        return hashlib.sha256(
            self.snapshot_plaintext() + self.sequence.to_bytes(8, "big") + self.head_hash
        ).digest()
