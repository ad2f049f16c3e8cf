"""The collaborators the key manager and the commit heads share, wired once by ``open_keyvault``.

Both check an enclave's attestation token (:class:`TokenVerifier`) against the operator's
enclave policy, sign what they hand out with the keyvault release key, and write their
effects and audit events in one store transaction; the key manager also wraps data keys
under the KEK. Tests and replicas vary one collaborator with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.clock import Clock
from veil.services.keyvault.enclave_policy import EnclavePolicy
from veil.services.keyvault.kek import Kek
from veil.services.keyvault.release_key import ReleaseSigner
from veil.services.keyvault.store import Store
from veil.services.keyvault.tokens import TokenVerifier


@dataclass(frozen=True)
class Deps:
    """A keyvault replica's store, KEK, audit log, clock, token verifier, release key and
    operator enclave policy."""

    store: Store
    kek: Kek
    audit: AuditLog
    clock: Clock
    verifier: TokenVerifier
    release_signer: ReleaseSigner
    enclave_policy: EnclavePolicy
