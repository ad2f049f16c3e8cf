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
    The rebuilt handler depends only on the method and the handler beneath it, so it is built
    once per method and reused while the handler beneath stays the same object (the registered
    handler, or the interceptor below's own reused one): rebuilding it on every call cost each
    interceptor a handler and closures per call.
    """

    _built: dict[str, tuple[Handler, Handler]]

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
        if handler is None:
            return None
        method = handler_call_details.method
        built: dict[str, tuple[Handler, Handler]] = self.__dict__.setdefault("_built", {})
        cached = built.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        rebuilt = self.intercept_handler(handler, method)
        built[method] = (handler, rebuilt)  # a race only builds it twice
        return rebuilt
