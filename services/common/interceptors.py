"""One way to wrap the behaviour of any gRPC method handler, whatever its arity."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

Behavior = Callable[[Any, grpc.ServicerContext], Any]
Wrapper = Callable[[Behavior, str], Behavior]
if TYPE_CHECKING:
    # grpc's stubs make the handler generic; at run time it is a plain class.
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


def wrap_handler(handler: Handler, method: str, wrap: Wrapper) -> Handler:
    """Rebuild `handler` with its behaviour passed through `wrap(behavior, method)`."""
    kinds: tuple[tuple[Any, Callable[..., Handler]], ...] = (
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


class HandlerInterceptor(grpc.ServerInterceptor):
    """A server interceptor that rebuilds each method's handler; subclasses say how.

    By default `intercept_handler` passes the behaviour through `wrap(behavior, method)`.
    """

    def wrap(self, behavior: Behavior, method: str) -> Behavior:
        raise NotImplementedError

    def intercept_handler(self, handler: Handler, method: str) -> Handler:
        return wrap_handler(handler, method, self.wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else self.intercept_handler(handler, handler_call_details.method)
