"""The keyvault's object graph: store, KEK, audit, tokens, keys, heads and attestation, wired once.

:func:`open_keyvault` builds everything from a :class:`KeyvaultConfig` and fails fast: the
config is checked (no start without an operator enclave policy unless the root is ``dev``),
the attestation root and the operator enclave policy loaded, the store schema created, the KEK
opened (file created 0600 or HSM key found/created), and a token-signing key and the
release-signing key ensured (and shown to unwrap under this KEK), before any RPC is served.
The one :class:`~veil.services.keyvault.enclave_policy.EnclavePolicy` is shared by key release
(``instance.*`` keys) and commit heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from veil.services.common.config import ENV_KEYVAULT_ENCLAVE_POLICY_FILE
from veil.services.keyvault.attest import Attestor, CollateralProvider
from veil.services.keyvault.audit import AuditLog, AuditVerifier
from veil.services.keyvault.clock import Clock, system_clock
from veil.services.keyvault.collateral_files import CollateralFiles
from veil.services.keyvault.config import KeyvaultConfig
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.enclave_policy import EnclavePolicy, load_enclave_policy
from veil.services.keyvault.heads import CommitHeads
from veil.services.keyvault.hold_keys import HoldRoots
from veil.services.keyvault.kek import FileKek, Kek, Pkcs11Kek
from veil.services.keyvault.keys import KeyManager
from veil.services.keyvault.leases import Leases
from veil.services.keyvault.release_key import ReleaseSigner, load_or_create_release_signer
from veil.services.keyvault.store import Store
from veil.services.keyvault.store_postgres import PostgresStore
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.keyvault.tokens import SigningKeyRing, TokenIssuer, TokenVerifier
from veil.verify.roots import resolve_root

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keyvault:
    """Every keyvault library object, sharing one store, KEK and clock."""

    store: Store
    kek: Kek
    audit: AuditLog
    ring: SigningKeyRing
    release_signer: ReleaseSigner
    issuer: TokenIssuer
    verifier: TokenVerifier
    enclave_policy: EnclavePolicy
    keys: KeyManager
    heads: CommitHeads
    hold_roots: HoldRoots
    attestor: Attestor
    leases: Leases
    #: Where quote collateral comes from (``GetStatus.collateral_source``): ``files:DIR``, ``none``.
    collateral_source: str = "none"
    #: Re-verifies the audit chain periodically (None when not started).
    audit_verifier: AuditVerifier | None = None

    def close(self) -> None:
        if self.audit_verifier is not None:
            self.audit_verifier.stop()
        self.hold_roots.close()
        self.kek.close()
        self.store.close()


def open_store(config: KeyvaultConfig) -> Store:
    if config.uses_postgres:
        return PostgresStore(config.db, schema=config.db_schema)
    path = config.sqlite_path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SqliteStore(path)


def open_kek(config: KeyvaultConfig) -> Kek:
    kek = config.kek
    if kek.provider == "pkcs11":
        return Pkcs11Kek(
            kek.pkcs11_module,
            token_label=kek.pkcs11_token_label,
            pin=kek.pkcs11_pin,
            key_label=kek.pkcs11_key_label,
        )
    assert kek.file is not None  # KekConfig.check
    return FileKek(kek.file)


def load_operator_policy(config: KeyvaultConfig) -> EnclavePolicy:
    """The operator enclave policy, or its absence where the config allows it (``dev`` root only).

    Fails with :class:`ConfigError` naming ``VEIL_KEYVAULT_ENCLAVE_POLICY_FILE`` when the file is
    unreadable, invalid, or has no rule for this keyvault's issuer (``config.check()`` refuses a
    missing one where it is required).
    """
    if config.enclave_policy_file is None:
        _log.warning(
            "%s is not set (attestation root %r): instance-key releases and commit-head advances "
            "are refused until an operator enclave policy is configured",
            ENV_KEYVAULT_ENCLAVE_POLICY_FILE,
            config.attestation_root,
        )
        return EnclavePolicy.not_configured()
    return load_enclave_policy(config.enclave_policy_file, issuer=config.issuer)


def open_keyvault(
    config: KeyvaultConfig, *, clock: Clock = system_clock, collateral: CollateralProvider | None = None
) -> Keyvault:
    """Open the store and KEK and wire the libraries; the caller closes the result."""
    config.check()  # also for configs built without from_env: no production start without a policy
    enclave_policy = load_operator_policy(config)
    root = resolve_root(config.attestation_root, config.dev_root_path)
    collateral_source = "none" if collateral is None else "custom"
    if collateral is None and config.collateral_dir is not None:
        files = CollateralFiles(config.collateral_dir)  # every file is read now: fail fast
        collateral, collateral_source = files, files.source
    if collateral is None:
        _log.warning("no quote collateral configured: tokens say TCB status Unevaluated")
    store = open_store(config)
    try:
        kek = open_kek(config)
    except BaseException:
        store.close()
        raise
    try:
        audit = AuditLog(store, clock)
        # Created once per deployment (race-free across replicas), then only ever loaded; first,
        # since it signs every audit tip: a rewritten or unsigned log refuses to start.
        release_signer = load_or_create_release_signer(store, kek, audit, clock)
        audit.verify_chain()
        audit_verifier = AuditVerifier(audit)
        ring = SigningKeyRing(store, kek, clock, audit, token_ttl_s=config.token_ttl_s)
        ring.purge()
        ring.current()  # a signing key exists (and unwraps under this KEK) before we serve
        issuer = TokenIssuer(ring, issuer=config.issuer, clock=clock, token_ttl_s=config.token_ttl_s)
        verifier = TokenVerifier(ring, issuer=config.issuer, clock=clock)
        deps = Deps(store, kek, audit, clock, verifier, release_signer, enclave_policy)
        keys = KeyManager(deps)
        keyvault = Keyvault(
            store=store,
            kek=kek,
            audit=audit,
            ring=ring,
            release_signer=release_signer,
            issuer=issuer,
            verifier=verifier,
            enclave_policy=enclave_policy,
            keys=keys,
            heads=CommitHeads(deps),
            hold_roots=HoldRoots(keys.data_key),
            attestor=Attestor(
                issuer,
                audit,
                clock,
                root_public_key=root,
                release_public_key=release_signer.public_key,
                collateral=collateral,
            ),
            leases=Leases(store, audit, clock),
            collateral_source=collateral_source,
            audit_verifier=audit_verifier,
        )
        audit_verifier.start()
        return keyvault
    except BaseException:
        kek.close()
        store.close()
        raise
