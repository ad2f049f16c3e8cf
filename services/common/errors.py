"""Domain errors and the one interceptor that maps them to gRPC statuses.

Handlers raise a `VeilError` subclass; the interceptor turns it into a
`google.rpc.Status` carrying `google.rpc.ErrorInfo` (reason, domain, metadata).
Any other exception becomes INTERNAL with a fixed message: internal detail is
logged with the trace id, never sent to the caller.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from veil.services.common.interceptors import Behavior, HandlerInterceptor
from veil.status import ERROR_DOMAIN

_log = logging.getLogger(__name__)


class VeilError(Exception):
    """An expected failure with a gRPC status code and a machine-readable reason."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        internal: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        # The message and metadata came from another service of the mesh: they may name its
        # internals, so a server facing the public (the gateway) shows them to mesh callers only.
        self.internal = internal

    def to_status(self) -> status_pb2.Status:
        """The `google.rpc.Status` sent to the caller."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])


class InvalidArgument(VeilError):
    """The request is malformed; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(VeilError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(VeilError):
    """The resource to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(VeilError):
    """The authenticated caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(VeilError):
    """The caller's credentials are missing or invalid."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(VeilError):
    """The system is not in a state that allows this."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(VeilError):
    """A quota, rate limit or memory budget is exhausted."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(VeilError):
    """A dependency is unreachable; the call may be retried with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(VeilError):
    """Stored data failed authentication or is inconsistent."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Aborted(VeilError):
    """A concurrent change conflicted; retry the whole operation."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class DeadlineExceeded(VeilError):
    """The deadline passed before the operation finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


CORRELATION_ID = "correlation_id"
Presenter = Callable[[VeilError, grpc.ServicerContext], VeilError]
"""What a server shows a caller of an error (the gateway hides internal detail from the public)."""


def new_correlation_id() -> str:
    """An id naming one failure in the logs and in the caller's ErrorInfo."""
    return secrets.token_hex(8)


def internal_status(correlation_id: str) -> status_pb2.Status:
    """INTERNAL with a fixed message and the correlation id the log shares (nothing else leaks)."""
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=ERROR_DOMAIN, metadata={CORRELATION_ID: correlation_id}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (correlation id {correlation_id})",
        details=[detail],
    )


def _aborted(context: grpc.ServicerContext) -> bool:
    # A handler that called context.abort() itself has set its status; keep it.
    return cast(Any, context).code() is not None


def abort(context: grpc.ServicerContext, error: VeilError) -> None:
    """End the call with `error`'s status and ErrorInfo (raises inside gRPC)."""
    _abort(context, error.to_status())


def _abort(context: grpc.ServicerContext, status: status_pb2.Status) -> None:
    context.abort_with_status(rpc_status.to_status(status))


def _shown(error: VeilError, context: grpc.ServicerContext) -> VeilError:
    return error


class ErrorInterceptor(HandlerInterceptor):
    """Maps domain errors to statuses with ErrorInfo; hides unexpected errors as INTERNAL.

    `present` picks what a caller sees of a domain error (default: the error itself).
    Unexpected errors are logged with a correlation id, which the caller gets in ErrorInfo.
    """

    def __init__(self, present: Presenter | None = None) -> None:
        self._present = present or _shown

    def wrap(self, behavior: Behavior, method: str) -> Behavior:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                result = behavior(request, context)
                if inspect.isgenerator(result):  # server streaming: errors surface while iterating
                    return self._guard_iteration(result, context, method)
                return result
            except Exception as exc:
                self._handle(exc, context, method)
            return None  # unreachable: _handle always raises

        return guarded

    def _guard_iteration(
        self, items: Iterator[Any], context: grpc.ServicerContext, method: str
    ) -> Iterator[Any]:
        try:
            yield from items
        except Exception as exc:
            self._handle(exc, context, method)

    def _handle(self, exc: Exception, context: grpc.ServicerContext, method: str) -> None:
        if isinstance(exc, VeilError):
            _abort(context, self._present(exc, context).to_status())
        if _aborted(context):  # the handler already aborted the call with its own status
            raise exc
        correlation_id = new_correlation_id()
        _log.exception("unhandled error in %s (correlation id %s)", method, correlation_id, exc_info=exc)
        _abort(context, internal_status(correlation_id))
