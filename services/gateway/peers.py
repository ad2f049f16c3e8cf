"""Who is calling the gateway, and which methods a caller without a certificate may use.

The gateway listens twice (build_server's public_listen): on its main port, which
requires a client certificate from the Veil CA (verified by gRPC, as on every Veil port),
and on a TLS-only public port, where gRPC Python cannot even request one, so every caller
there is anonymous to the transport. A certificate therefore appears in a call's auth
context only when gRPC verified it, and its SPIFFE ID can be believed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import grpc

from veil.services.common.errors import PermissionDenied, Unauthenticated, VeilError, abort
from veil.services.common.identity import spiffe_id_from_pem
from veil.services.common.interceptors import Behavior, wrap_handler

_log = logging.getLogger(__name__)

PUBLIC = frozenset({"*"})
"""Table value: any caller, with or without a client certificate."""

AUTHENTICATED = frozenset({"**"})
"""Table value: any caller holding a (gRPC-verified) client certificate."""


def certificate_identity(context: grpc.ServicerContext) -> str | None:
    """The caller's SPIFFE ID on the mTLS port; None on the public port."""
    # The stub says Mapping[str, bytes]; gRPC really maps each property to a list of values.
    pems = cast(Mapping[str, list[bytes]], context.auth_context()).get("x509_pem_cert")
    return spiffe_id_from_pem(pems[0]) if pems else None


class PublicAuthorizationInterceptor(grpc.ServerInterceptor):
    """Per-method authorization across the mTLS and the public listener.

    `table` maps full method names to allowed SPIFFE IDs, `PUBLIC` (anyone) or
    `AUTHENTICATED` (any certificate); methods missing from it are denied. Services named
    in `open_services` (health, reflection) count as `AUTHENTICATED`, as on every Veil port.
    """

    def __init__(self, table: Mapping[str, frozenset[str]], open_services: tuple[str, ...] = ()) -> None:
        self._table = dict(table)
        self._open_prefixes = tuple(f"/{name}/" for name in open_services)

    def _allowed(self, method: str) -> frozenset[str]:
        if method.startswith(self._open_prefixes):
            return AUTHENTICATED
        return self._table.get(method, frozenset())

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        allowed = self._allowed(handler_call_details.method)

        def check(behavior: Behavior, method: str) -> Behavior:
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                if allowed != PUBLIC:
                    try:
                        caller = certificate_identity(context)
                        if caller is None:
                            raise Unauthenticated(
                                f"{method} requires a client certificate (use the mTLS port)"
                            )
                        if allowed != AUTHENTICATED and caller not in allowed:
                            _log.warning("denied %s to %s", method, caller)
                            raise PermissionDenied(
                                f"{caller} may not call {method}",
                                metadata={"caller": caller, "method": method},
                            )
                    except VeilError as exc:
                        abort(context, exc)
                return behavior(request, context)

            return checked

        return wrap_handler(handler, handler_call_details.method, check)
