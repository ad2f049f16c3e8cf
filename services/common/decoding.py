"""The one request-decoding path of every Veil server: size limit, then parsing, as domain errors.

Left to grpcio, a request that does not parse never reaches our code and the caller gets
INTERNAL ("Exception deserializing request!"), and one over a limit gets no ErrorInfo. The
interceptor must be the innermost one: it swaps the handler's deserializer for the identity,
and the outer interceptors (errors, authorization) keep it, so a refusal here is mapped like
any other domain error and an unauthorized caller is refused before its bytes are parsed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from veil.services.common.errors import InvalidArgument, ResourceExhausted
from veil.services.common.interceptors import HandlerInterceptor

if TYPE_CHECKING:
    from veil.services.common.interceptors import Handler


def _identity(raw: bytes) -> bytes:
    return raw


class DecodeInterceptor(HandlerInterceptor):
    """Refuses a unary request over `max_bytes` (RESOURCE_EXHAUSTED) or that does not parse as
    the method's request (INVALID_ARGUMENT), inside the handler."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes

    def intercept_handler(self, handler: Handler, method: str) -> Handler:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        behavior = handler.unary_unary or handler.unary_stream
        if behavior is None:
            return handler
        max_bytes = self._max_bytes

        def decoding(request: bytes, context: grpc.ServicerContext) -> Any:
            if len(request) > max_bytes:
                raise ResourceExhausted(
                    f"request of {len(request)} bytes exceeds the limit of {max_bytes}",
                    reason="MESSAGE_TOO_LARGE",
                    metadata={"limit_bytes": str(max_bytes)},
                )
            try:
                message = parse(request)
            except Exception:  # any parse failure: the bytes are not this method's request
                raise InvalidArgument(
                    f"{method}: the request is not a valid message", reason="MALFORMED_REQUEST"
                ) from None
            return behavior(message, context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(
            decoding, request_deserializer=_identity, response_serializer=handler.response_serializer
        )
