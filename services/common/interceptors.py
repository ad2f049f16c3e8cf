"""One way to wrap the behaviour of any gRPC method handler, whatever its arity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[[Any, grpc.ServicerContext], Any]
Wrapper = Callable[[Behavior, str], Behavior]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, wrap: Wrapper
) -> grpc.RpcMethodHandler[Any, Any]:
    """Rebuild `handler` with its behaviour passed through `wrap(behavior, method)`."""
    kinds: tuple[tuple[Any, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    for behavior, factory in kinds:
        if behavior is not None:
            return factory(
                wrap(behavior, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _identity(raw: bytes) -> bytes:
    return raw


class DecodeInterceptor(grpc.ServerInterceptor):
    """Parses unary requests inside the handler, so an undecodable one is INVALID_ARGUMENT.

    Left to grpcio, a request that does not parse never reaches our code and the caller gets
    INTERNAL ("Exception deserializing request!"). This interceptor must be the innermost one:
    it swaps the handler's deserializer for the identity, and the outer interceptors keep it.
    `invalid` builds the domain error to raise (errors.py imports this module, hence the hook).
    """

    def __init__(self, invalid: Callable[[str], Exception]):
        self._invalid = invalid

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        behavior = handler.unary_unary or handler.unary_stream
        if behavior is None:
            return handler
        invalid = self._invalid

        def decoding(request: bytes, context: grpc.ServicerContext) -> Any:
            try:
                message = parse(request)
            except Exception:  # any parse failure: the bytes are not this method's request
                raise invalid(f"{handler_call_details.method}: the request is not a valid message") from None
            return behavior(message, context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(
            decoding, request_deserializer=_identity, response_serializer=handler.response_serializer
        )
