"""Service identity from the peer certificate's SPIFFE URI SAN, and per-method authorization.

mTLS proves a caller holds a certificate from one of our CAs; this module decides what that
caller may do. `spiffe://veil/admin` is believed only from a leaf the admin CA issued directly,
and the admin CA's leaves are believed for nothing else: the CA that issues service identities
(cert-manager's, in a cluster) cannot make an admin, nor the admin CA a service. Every method
must appear in the service's table: a method missing from it is denied (fail closed). The one
interceptor serves every port: on a strict mTLS port every caller has a certificate; on the
gateway's TLS-only public port (where gRPC Python cannot even request one) only methods marked
`PUBLIC` admit a caller without one. A certificate appears in a call's auth context only when
gRPC verified it, so its SPIFFE ID can be believed.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from veil.services.common.errors import PermissionDenied, Unauthenticated, VeilError, abort
from veil.services.common.interceptors import Behavior, HandlerInterceptor

SPIFFE_TRUST_DOMAIN = "veil"
KEYVAULT = "spiffe://veil/keyvault"
STATE = "spiffe://veil/state"
GATEWAY = "spiffe://veil/gateway"
ADMIN = "spiffe://veil/admin"
SERVICE_IDENTITIES: Mapping[str, str] = {"keyvault": KEYVAULT, "state": STATE, "gateway": GATEWAY}

# Health and reflection are open to every authenticated peer (operators use grpcurl).
OPEN_SERVICES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
    "grpc.reflection.v1.ServerReflection",
)

_log = logging.getLogger(__name__)

PUBLIC = frozenset({"*"})
"""Table value: any caller, with or without a client certificate."""

AUTHENTICATED = frozenset({"**"})
"""Table value: any caller holding a (gRPC-verified) client certificate."""

AuthorizationTable = Mapping[str, frozenset[str]]
"""Full method name ("/pkg.Service/Method") → SPIFFE IDs allowed to call it, `PUBLIC` or
`AUTHENTICATED`."""


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


# The call the authorization interceptor is running on this thread, and the identity it found:
# a handler asking again for the same call's identity reuses it instead of rebuilding gRPC's
# auth context and looking its certificate up again. Keyed by the context object itself, which
# the entry keeps alive while it is set, so it never answers for another call.
_checked = threading.local()


def certificate_identity(context: grpc.ServicerContext) -> str | None:
    """The caller's SPIFFE ID, or None for a caller without a certificate (public port)."""
    known = getattr(_checked, "call", None)
    if known is not None and known[0] is context:
        return cast(str | None, known[1])
    # The stub says Mapping[str, bytes]; gRPC really maps each property to a list of values.
    pems = cast(Mapping[str, list[bytes]], context.auth_context()).get("x509_pem_cert")
    return spiffe_id_from_pem(pems[0]) if pems else None


def peer_identity(context: grpc.ServicerContext) -> str:
    """The caller's SPIFFE ID, taken from the certificate its TLS session proved."""
    caller = certificate_identity(context)
    if caller is None:
        raise Unauthenticated("no client certificate")
    return caller


def method_names(service_full_name: str, methods: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Expand {"Method": ids} for one service into the full-method-name table."""
    return {f"/{service_full_name}/{name}": ids for name, ids in methods.items()}


class AdminIssuer:
    """Tells whether a client certificate was issued directly by the admin CA."""

    def __init__(self, admin_ca: Path | None, variable: str = "the service's ADMIN_CA") -> None:
        # Read once at start: the admin CA is long-lived; a new one needs a rollout.
        self._cas = x509.load_pem_x509_certificates(admin_ca.read_bytes()) if admin_ca is not None else []
        self.variable = variable
        self.issued = functools.lru_cache(maxsize=256)(self._issued)

    def _issued(self, pem: bytes) -> bool:
        leaf = x509.load_pem_x509_certificate(pem)
        for ca in self._cas:
            try:
                leaf.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False

    def identity(self, context: grpc.ServicerContext) -> str | None:
        """The caller's SPIFFE ID once its issuer fits it; None without a certificate."""
        pems = cast(Mapping[str, list[bytes]], context.auth_context()).get("x509_pem_cert")
        if not pems:
            return None
        caller = spiffe_id_from_pem(pems[0])
        from_admin_ca = self.issued(pems[0])
        if caller == ADMIN and not from_admin_ca:
            _log.warning("refused an admin certificate not issued by the admin CA")
            raise Unauthenticated(
                f"{ADMIN} is accepted only from a certificate of the admin CA ({self.variable})",
                reason="ADMIN_CA_REQUIRED",
            )
        if caller != ADMIN and from_admin_ca:
            _log.warning("refused %s from a certificate of the admin CA", caller)
            raise Unauthenticated(
                f"the admin CA issues {ADMIN} only, not {caller}", reason="NOT_ADMIN_IDENTITY"
            )
        return caller


class AuthorizationInterceptor(HandlerInterceptor):
    """Checks the caller's SPIFFE ID (and that its issuer fits it) against the table before the
    handler runs.

    Services named in `OPEN_SERVICES` (health, reflection) count as `AUTHENTICATED`.
    """

    def __init__(self, table: AuthorizationTable, admin_issuer: AdminIssuer | None = None):
        self._table = dict(table)
        self._open_prefixes = tuple(f"/{name}/" for name in OPEN_SERVICES)
        self._admin = admin_issuer or AdminIssuer(None)

    def _allowed(self, method: str) -> frozenset[str]:
        if method.startswith(self._open_prefixes):
            return AUTHENTICATED
        return self._table.get(method, frozenset())

    def wrap(self, behavior: Behavior, method: str) -> Behavior:
        allowed = self._allowed(method)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                caller = self._admin.identity(context)
                if allowed != PUBLIC:
                    _authorize(caller, allowed, method)
            except VeilError as exc:
                abort(context, exc)
            outer = getattr(_checked, "call", None)
            _checked.call = (context, caller)
            try:
                return behavior(request, context)
            finally:
                _checked.call = outer

        return checked


def _authorize(caller: str | None, allowed: frozenset[str], method: str) -> None:
    if caller is None:
        raise Unauthenticated(f"{method} requires a client certificate (use the mTLS port)")
    if allowed != AUTHENTICATED and caller not in allowed:
        _log.warning("denied %s to %s", method, caller)
        raise PermissionDenied(
            f"{caller} may not call {method}", metadata={"caller": caller, "method": method}
        )
