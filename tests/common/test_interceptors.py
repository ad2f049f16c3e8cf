"""Interceptors rebuild a method's handler once, and the authorization interceptor's identity
is the one a handler reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import grpc

from veil.services.common import identity
from veil.services.common.identity import AuthorizationInterceptor
from veil.services.common.interceptors import Behavior, HandlerInterceptor

METHOD = "/veil.test.v1.TestService/Do"


class _Counting(HandlerInterceptor):
    def __init__(self) -> None:
        self.wrapped: list[str] = []

    def wrap(self, behavior: Behavior, method: str) -> Behavior:
        self.wrapped.append(method)
        return behavior


def _details(method: str) -> grpc.HandlerCallDetails:
    details: Any = type("Details", (), {"method": method, "invocation_metadata": ()})()
    return cast(grpc.HandlerCallDetails, details)


def _handler() -> Any:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def test_a_methods_handler_is_rebuilt_only_when_the_handler_beneath_changes() -> None:
    interceptor = _Counting()
    first, second = _handler(), _handler()
    built = interceptor.intercept_service(lambda _: first, _details(METHOD))
    assert interceptor.intercept_service(lambda _: first, _details(METHOD)) is built
    assert interceptor.wrapped == [METHOD]
    assert interceptor.intercept_service(lambda _: second, _details(METHOD)) is not built
    assert interceptor.intercept_service(lambda _: first, _details("/other/Method")) is not built
    assert interceptor.wrapped == [METHOD, METHOD, "/other/Method"]
    assert interceptor.intercept_service(lambda _: None, _details("/unknown/Method")) is None


class _FakeContext:
    """The part of a servicer context the authorization path reads, counting certificate look-ups."""

    def __init__(self, pem: bytes | None) -> None:
        self._pem = pem
        self.lookups = 0

    def auth_context(self) -> dict[str, list[bytes]]:
        self.lookups += 1
        return {"x509_pem_cert": [self._pem]} if self._pem is not None else {}


def test_a_handler_reads_the_identity_the_interceptor_checked(pki_dir: Path) -> None:
    seen: list[str | None] = []

    def handler(request: Any, context: Any) -> Any:
        seen.append(identity.certificate_identity(context))
        return request

    table = {METHOD: identity.PUBLIC}
    checked = AuthorizationInterceptor(table).wrap(handler, METHOD)
    gateway = _FakeContext((pki_dir / "gateway.pem").read_bytes())
    anonymous = _FakeContext(None)
    assert checked("request", cast(grpc.ServicerContext, gateway)) == "request"
    assert checked("request", cast(grpc.ServicerContext, anonymous)) == "request"
    assert seen == [identity.GATEWAY, None]
    assert gateway.lookups == anonymous.lookups == 1  # the handler's question cost none
    # Outside the call (or for another context) the identity is read from the context again.
    assert identity.certificate_identity(cast(grpc.ServicerContext, gateway)) == identity.GATEWAY
    assert gateway.lookups == 2
