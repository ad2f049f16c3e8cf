"""The ECALL table: the only way into the enclave.

`Dispatcher.handle` takes one serialized EcallFrame and returns one serialized EcallReply.
The method name selects a handler from an explicit table; an unknown method is UNIMPLEMENTED,
an undecodable frame or payload is INVALID_ARGUMENT, and a bug is INTERNAL with no detail.
Handlers change state only after all their checks pass, so every refused call changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.message import DecodeError, Message

from veil.enclave.errors import INTERNAL, INVALID_ARGUMENT, UNIMPLEMENTED, EnclaveError
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import ecall_pb2, error_pb2

_log = logging.getLogger(__name__)

Handler = tuple[type[Message], Callable[[Any], Message]]


def ecall_table(enclave: Enclave) -> Mapping[str, Handler]:
    """Method name (as in `service EnclaveService`) -> (request type, handler)."""
    return {
        "Initialize": (ecall_pb2.InitializeRequest, enclave.initialize),
        "GetQuote": (ecall_pb2.GetQuoteRequest, enclave.get_quote),
        "IssueChallenge": (ecall_pb2.IssueChallengeRequest, enclave.issue_challenge),
        "ProvisionKey": (ecall_pb2.ProvisionKeyRequest, enclave.provision_key),
        "CreateInstance": (ecall_pb2.CreateInstanceRequest, enclave.create_instance),
        "ExecuteBatch": (ecall_pb2.ExecuteBatchRequest, enclave.execute_batch),
        "Query": (ecall_pb2.QueryRequest, enclave.query),
        "Snapshot": (ecall_pb2.SnapshotRequest, enclave.snapshot),
        "Restore": (ecall_pb2.RestoreRequest, enclave.restore),
        "ConfirmHead": (ecall_pb2.ConfirmHeadRequest, enclave.confirm_head),
        "Seal": (ecall_pb2.SealRequest, enclave.seal),
        "Unseal": (ecall_pb2.UnsealRequest, enclave.unseal),
        "GetStatus": (ecall_pb2.GetStatusRequest, enclave.get_status),
    }


def error_reply(code: error_pb2.EcallErrorCode.ValueType, message: str) -> bytes:
    """A serialized EcallReply carrying an error."""
    return ecall_pb2.EcallReply(error=error_pb2.EcallError(code=code, message=message)).SerializeToString()


class Dispatcher:
    """Routes EcallFrames to the enclave."""

    def __init__(self, enclave: Enclave) -> None:
        self.enclave = enclave
        self._table = ecall_table(enclave)

    def handle(self, frame_bytes: bytes) -> bytes:
        """Serve one serialized EcallFrame; always returns a serialized EcallReply."""
        try:
            frame = ecall_pb2.EcallFrame.FromString(frame_bytes)
        except DecodeError:
            return error_reply(INVALID_ARGUMENT, "frame is not an EcallFrame")
        entry = self._table.get(frame.method)
        if entry is None:
            return error_reply(UNIMPLEMENTED, f"unknown ECALL {frame.method[:64]!r}")
        request_type, handler = entry
        try:
            request = request_type.FromString(frame.payload)
        except DecodeError:
            return error_reply(INVALID_ARGUMENT, f"payload is not a {request_type.__name__}")
        try:
            response = handler(request)
        except EnclaveError as refusal:
            return ecall_pb2.EcallReply(error=refusal.to_proto()).SerializeToString()
        except Exception as bug:  # a bug: report it without leaking its detail
            _log.error("internal error in %s: %s", frame.method, type(bug).__name__)
            return error_reply(INTERNAL, "internal error")
        return ecall_pb2.EcallReply(
            payload=response.SerializeToString(deterministic=True)
        ).SerializeToString()
