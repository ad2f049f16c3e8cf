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
