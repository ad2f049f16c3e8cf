"""The keyvault's object graph: store, KEK, audit, tokens, keys, heads and attestation, wired once.

:func:`open_keyvault` builds everything from a :class:`KeyvaultConfig` and fails fast: the
store schema is created, the KEK opened (file created 0600 or HSM key found/created), the
attestation root loaded, and a token-signing key and the release-signing key ensured (and
shown to unwrap under this KEK), before any RPC is served.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.keyvault.attest import Attestor, CollateralProvider
from services.keyvault.attestation.roots import resolve_root
from services.keyvault.audit import AuditLog
from services.keyvault.clock import Clock, system_clock
from services.keyvault.config import KeyvaultConfig
from services.keyvault.heads import CommitHeads
from services.keyvault.kek import FileKek, Kek, Pkcs11Kek
from services.keyvault.keys import KeyManager
from services.keyvault.policy import ReleasePolicy, parse_policy
from services.keyvault.release_key import ReleaseSigner, load_or_create_release_signer
from services.keyvault.store import Store
from services.keyvault.store_postgres import PostgresStore
from services.keyvault.store_sqlite import SqliteStore
from services.keyvault.tokens import SigningKeyRing, TokenIssuer, TokenVerifier


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
    keys: KeyManager
    heads: CommitHeads
    attestor: Attestor

    def close(self) -> None:
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


def _head_policy(config: KeyvaultConfig) -> ReleasePolicy | None:
    if config.head_policy_file is None:
        return None
    return parse_policy(config.head_policy_file.read_bytes())


def open_keyvault(
    config: KeyvaultConfig, *, clock: Clock = system_clock, collateral: CollateralProvider | None = None
) -> Keyvault:
    """Open the store and KEK and wire the libraries; the caller closes the result."""
    root = resolve_root(config.attestation_root, config.dev_root_path)
    head_policy = _head_policy(config)
    store = open_store(config)
    try:
        kek = open_kek(config)
    except BaseException:
        store.close()
        raise
    try:
        audit = AuditLog(store, clock)
        ring = SigningKeyRing(store, kek, clock, audit, token_ttl_s=config.token_ttl_s)
        ring.purge()
        ring.current()  # a signing key exists (and unwraps under this KEK) before we serve
        # Created once per deployment (race-free across replicas), then only ever loaded.
        release_signer = load_or_create_release_signer(store, kek, audit, clock)
        issuer = TokenIssuer(ring, issuer=config.issuer, clock=clock, token_ttl_s=config.token_ttl_s)
        verifier = TokenVerifier(ring, issuer=config.issuer, clock=clock)
        return Keyvault(
            store=store,
            kek=kek,
            audit=audit,
            ring=ring,
            release_signer=release_signer,
            issuer=issuer,
            verifier=verifier,
            keys=KeyManager(store, kek, audit, verifier, clock, release_signer=release_signer),
            heads=CommitHeads(store, audit, verifier, clock, attestation_policy=head_policy),
            attestor=Attestor(
                issuer,
                audit,
                clock,
                root_public_key=root,
                release_public_key=release_signer.public_key,
                collateral=collateral,
            ),
        )
    except BaseException:
        kek.close()
        store.close()
        raise
