"""Service identity from the peer certificate's SPIFFE URI SAN, and per-method authorization.

mTLS (with client certificates required) proves a caller holds a certificate from
our CA; this module decides what that caller may do. Every method must appear in
the service's table: a method missing from it is denied (fail closed).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from veil.services.common.errors import PermissionDenied, Unauthenticated, VeilError, abort
from veil.services.common.interceptors import Behavior, wrap_handler

SPIFFE_TRUST_DOMAIN = "veil"
KEYVAULT = "spiffe://veil/keyvault"
STATE = "spiffe://veil/state"
GATEWAY = "spiffe://veil/gateway"
ADMIN = "spiffe://veil/admin"
SERVICE_IDENTITIES: Mapping[str, str] = {"keyvault": KEYVAULT, "state": STATE, "gateway": GATEWAY}

# Health and reflection are open to every authenticated peer (operators use grpcurl).
_OPEN_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
    "grpc.reflection.v1.ServerReflection",
)

_log = logging.getLogger(__name__)

AuthorizationTable = Mapping[str, frozenset[str]]
"""Full method name ("/pkg.Service/Method") → SPIFFE IDs allowed to call it."""


@functools.lru_cache(maxsize=256)
def spiffe_id_from_pem(pem: bytes) -> str:
    """The single spiffe://veil/... URI SAN of a certificate; anything else is refused."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise Unauthenticated("client certificate has no subject alternative name") from exc
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(uris) != 1 or not uris[0].startswith(f"spiffe://{SPIFFE_TRUST_DOMAIN}/"):
        raise Unauthenticated("client certificate must carry exactly one spiffe://veil/ URI SAN")
    return uris[0]


def peer_identity(context: grpc.ServicerContext) -> str:
    """The caller's SPIFFE ID, taken from the certificate its TLS session proved."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("no client certificate")
    return spiffe_id_from_pem(pems[0])


def method_names(service_full_name: str, methods: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Expand {"Method": ids} for one service into the full-method-name table."""
    return {f"/{service_full_name}/{name}": ids for name, ids in methods.items()}


class AuthorizationInterceptor(grpc.ServerInterceptor):
    """Checks the caller's SPIFFE ID against the table before the handler runs."""

    def __init__(self, table: AuthorizationTable):
        self._table = dict(table)

    def _allowed(self, method: str) -> frozenset[str] | None:
        if method.startswith(tuple(f"/{name}/" for name in _OPEN_SERVICES)):
            return None  # any authenticated identity
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
                try:
                    caller = peer_identity(context)
                    if allowed is not None and caller not in allowed:
                        _log.warning("denied %s to %s", method, caller)
                        raise PermissionDenied(
                            f"{caller} may not call {method}", metadata={"caller": caller, "method": method}
                        )
                except VeilError as exc:
                    abort(context, exc)
                return behavior(request, context)

            return checked

        return wrap_handler(handler, handler_call_details.method, check)
