"""The one interface every app implements, and the helpers apps share.

An app is deterministic: its result and its writes depend only on the instance state, the
caller and the typed call, never on time, randomness or the host. It reads and writes state
only through `CallContext.store`, which lets the enclave roll a refused call back. Apps refuse
by raising `EnclaveError`; the enclave then records the refusal in the result and keeps none
of the call's writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from google.protobuf.message import Message

from veil.enclave.auth import Caller
from veil.enclave.errors import INVALID_ARGUMENT, EnclaveError
from veil.enclave.store import Store
from veil.enclave.v1 import apps_pb2, envelope_pb2

MAX_NAME_SIZE = 256

Handler = Callable[["CallContext", Any], Message]


@dataclass(frozen=True)
class CallContext:
    """What an app method sees: the state, the authenticated caller and the instance config."""

    store: Store
    caller: Caller
    config: envelope_pb2.InstanceConfig


class App(ABC):
    """A deterministic app: typed methods selected from the AppCall oneof `field`."""

    kind: ClassVar[int]
    field: ClassVar[str]
    read_only: ClassVar[frozenset[str]]

    def validate_config(self, config: envelope_pb2.InstanceConfig) -> None:  # noqa: B027 - optional hook
        """Refuse (EnclaveError) a configuration this app cannot run under."""

    @abstractmethod
    def methods(self) -> Mapping[str, Handler]:
        """Method name (the app call's oneof field) -> typed handler."""

    def method_of(self, call: apps_pb2.AppCall) -> str:
        """The method a call names, or INVALID_ARGUMENT."""
        if call.WhichOneof("call") != self.field:
            raise EnclaveError(INVALID_ARGUMENT, f"this instance runs the {self.field} app")
        method = getattr(call, self.field).WhichOneof("method")
        if method is None or method not in self.methods():
            raise EnclaveError(INVALID_ARGUMENT, "unknown app method")
        return str(method)

    def execute(self, context: CallContext, call: apps_pb2.AppCall) -> apps_pb2.AppResult:
        """Run one call; raises EnclaveError to refuse it."""
        method = self.method_of(call)
        result = self.methods()[method](context, getattr(getattr(call, self.field), method))
        app_result = apps_pb2.AppResult()
        getattr(getattr(app_result, self.field), method).CopyFrom(result)
        return app_result


def check_name(value: str, what: str) -> None:
    """Names (accounts, ids, options) are 1 to 256 bytes of UTF-8."""
    if not 0 < len(value.encode("utf-8")) <= MAX_NAME_SIZE:
        raise EnclaveError(INVALID_ARGUMENT, f"{what} must be 1 to {MAX_NAME_SIZE} bytes")


def load(store: Store, key: tuple[str, ...], message_type: type[Any]) -> Any:
    """Parse a stored message, or None when the key is absent."""
    raw = store.get(key)
    return None if raw is None else message_type.FromString(raw)


def save(store: Store, key: tuple[str, ...], message: Message) -> None:
    """Store a message deterministically."""
    store.put(key, message.SerializeToString(deterministic=True))
