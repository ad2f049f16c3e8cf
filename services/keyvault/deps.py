"""The collaborators the key manager and the commit heads share, wired once by ``open_keyvault``.

Both verify an enclave's attestation token, hold it to the operator's enclave policy (key
release: for instance keys), sign what they hand out with the release key, and write each
effect with its audit event in one store transaction; the key manager also wraps and unwraps
data keys under the KEK. Tests vary one collaborator (another replica's store, another
policy) with :func:`dataclasses.replace`.
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
