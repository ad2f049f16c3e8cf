"""Calls to the state replicas, and what their failures become for the gateway's caller.

A state replica's status is passed on when it describes the caller's request (not found,
invalid, exhausted, deadline, retry later), with its message and ErrorInfo reason: those
were already sanitized by the state service's own error interceptor. Anything that says
something about the mesh itself (the gateway's identity refused, an upstream bug, an
unimplemented method) becomes UNAVAILABLE with a fixed message, so nothing internal leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

import grpc

from veil.services.common.channels import call
from veil.services.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VeilError,
)
from veil.status import error_info

_log = logging.getLogger(__name__)

Resp = TypeVar("Resp")
Req = TypeVar("Req")

_PASSED_ON: Mapping[grpc.StatusCode, type[VeilError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def translate(error: grpc.RpcError, shard: str) -> VeilError:
    """The gateway's answer for a failed state call."""
    code = error.code()
    cls = _PASSED_ON.get(code)
    if cls is None:
        _log.error("state replica %s failed with %s: %s", shard, code.name, error.details())
        return Unavailable(
            "the state service could not serve the request", reason="UPSTREAM_ERROR", internal=True
        )
    info = error_info(error)
    reason = info.reason if info is not None and info.reason else None
    if code == grpc.StatusCode.UNAVAILABLE and reason is None:
        # A transport failure (no ErrorInfo): say so without naming addresses.
        return Unavailable(
            "the state replica for this instance is unreachable", reason="SHARD_UNAVAILABLE", internal=True
        )
    # Its text and reason are another service's: shown only to mesh callers (public_errors).
    return cls(error.details() or code.name.lower(), reason=reason, internal=True)


def forward(shard: str, method: Callable[..., Resp], request: Req, *, timeout: float) -> Resp:
    """Call a state method with the caller's remaining deadline; UNAVAILABLE is retried by `call`."""
    try:
        return call(method, request, timeout=timeout)
    except grpc.RpcError as error:
        raise translate(error, shard) from None
