"""The mesh's error contract as a caller reads it: the `google.rpc` details on a failed call.

Every Veil server ends a refused call with a `google.rpc.Status` carrying `ErrorInfo` (a stable
`reason` in the `ERROR_DOMAIN` domain) and, when retrying later helps, `RetryInfo`
(`veil.services.common.errors` writes them). The SDK and the services' own clients read them
here; `StatusError` carries one command's status out of an ExecuteBatch answer as a failed
call's error. Imports only grpc and the `google.rpc` messages.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

#: `ErrorInfo.domain` of every Veil error.
ERROR_DOMAIN = "veil.dev"


Detail = TypeVar("Detail", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)


def _detail(error: grpc.RpcError, kind: type[Detail]) -> Detail | None:
    """The first `kind` detail of a failed call's google.rpc.Status, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # RpcError raised by a call is also a Call
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a Veil server attached to a failed call, if any."""
    return _detail(error, error_details_pb2.ErrorInfo)


def retry_delay(error: grpc.RpcError) -> float | None:
    """The server's RetryInfo delay in seconds, if it sent one."""
    info = _detail(error, error_details_pb2.RetryInfo)
    return None if info is None else float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_DETAILS_KEY = "grpc-status-details-bin"


class StatusError(grpc.RpcError):
    """A `google.rpc.Status` (one command's, inside an ExecuteBatch answer) shaped as a failed
    unary call's error: code, details, and the status in its trailing metadata, which
    `error_info` and `grpc_status` read. Whoever handles a failed call handles it unchanged."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status

    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.status.code, grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return str(self.status.message)

    def trailing_metadata(self) -> Any:
        return ((_DETAILS_KEY, self.status.SerializeToString()),)
