"""Keyvault configuration: a frozen dataclass built from the environment, failing fast.

Shared names come from :mod:`veil.services.common.config`; the keyvault-only ones are defined
here. Defaults suit ``veil up`` on one machine (SQLite and a KEK file under
``<data dir>/keyvault/``); the attestation root defaults to Intel's, so a sim enclave is
refused unless the deployment opts into the dev root explicitly (fail closed).

=====================================  ======================================================================
``VEIL_KEYVAULT_DB``                   SQLite file path (or ``sqlite:PATH``), or a ``postgresql://`` DSN
``VEIL_KEYVAULT_DB_SCHEMA``            PostgreSQL schema (default ``veil_keyvault``)
``VEIL_KEYVAULT_DB_FILE``              a file holding that value (a DSN with a password): read once at
                                       start, refused when other users may read it; the manifests use it
``VEIL_KEYVAULT_ATTESTATION_ROOT``     ``intel`` (default), ``dev`` (``<data dir>/pki/sgx-root.pem``), a PEM
``VEIL_KEYVAULT_KEK_PROVIDER``         ``file`` (default) or ``pkcs11``
``VEIL_KEYVAULT_KEK_FILE``             key file for ``file`` (default ``<data dir>/keyvault/kek.bin``)
``VEIL_KEYVAULT_PKCS11_MODULE`` etc.   module path, token label, user PIN and key label for ``pkcs11``
``VEIL_KEYVAULT_PKCS11_PIN_FILE``      the user PIN from a file instead (read once, permission-checked)
``VEIL_KEYVAULT_ISSUER``               token ``iss`` and policy ``authority`` (default ``spiffe://veil/keyvault``)
``VEIL_KEYVAULT_TOKEN_TTL_SECONDS``    token lifetime (default 600)
``VEIL_KEYVAULT_ENCLAVE_POLICY_FILE``  the operator enclave policy (release-policy JSON): the state
                                       enclave builds trusted with instance keys and commit heads
``VEIL_KEYVAULT_COLLATERAL_DIR``       quote collateral, one ``<fmspc>.json`` per platform
                                       (:mod:`veil.services.keyvault.collateral_files`); unset: none, and
                                       tokens say TCB status ``Unevaluated``
=====================================  ======================================================================

The operator enclave policy (:mod:`veil.services.keyvault.enclave_policy`) is required unless the
attestation root is ``dev``: with ``intel`` or a PEM root and no policy the keyvault refuses to
start. With ``dev`` and no policy it starts, but refuses every instance-key release and every
commit-head advance (``ENCLAVE_POLICY_NOT_CONFIGURED``), so ``veil up`` must write one.
``VEIL_KEYVAULT_HEAD_POLICY_FILE`` (which restricted head advances only) was replaced by it;
setting the old name is a start-up error, so nobody believes it still applies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from veil.services.common.config import (
    ENV_KEYVAULT_ATTESTATION_ROOT,
    ENV_KEYVAULT_DB,
    ENV_KEYVAULT_ENCLAVE_POLICY_FILE,
    ENV_KEYVAULT_KEK_FILE,
    ENV_KEYVAULT_KEK_PROVIDER,
    ENV_KEYVAULT_PKCS11_KEY_LABEL,
    ENV_KEYVAULT_PKCS11_MODULE,
    ENV_KEYVAULT_PKCS11_PIN,
    ENV_KEYVAULT_PKCS11_TOKEN_LABEL,
    ConfigError,
    secret_setting,
)
from veil.services.keyvault.tokens import DEFAULT_TOKEN_TTL_S
from veil.verify.tokens import MAX_TOKEN_LIFETIME_S

ENV_KEYVAULT_DB_SCHEMA = "VEIL_KEYVAULT_DB_SCHEMA"
ENV_KEYVAULT_ISSUER = "VEIL_KEYVAULT_ISSUER"
ENV_KEYVAULT_TOKEN_TTL = "VEIL_KEYVAULT_TOKEN_TTL_SECONDS"  # noqa: S105 - an env name, not a secret
ENV_KEYVAULT_COLLATERAL_DIR = "VEIL_KEYVAULT_COLLATERAL_DIR"
#: Replaced by ENV_KEYVAULT_ENCLAVE_POLICY_FILE; still recognised only to refuse it.
REPLACED_HEAD_POLICY_FILE = "VEIL_KEYVAULT_HEAD_POLICY_FILE"

DEFAULT_ISSUER = "spiffe://veil/keyvault"
DEFAULT_DB_SCHEMA = "veil_keyvault"
KEK_PROVIDERS = ("file", "pkcs11")
#: The one attestation root under which the keyvault may start without an enclave policy.
DEV_ROOT = "dev"


@dataclass(frozen=True)
class KekConfig:
    """Which KEK to use and how to reach it."""

    provider: str
    file: Path | None = None
    pkcs11_module: str = ""
    pkcs11_token_label: str = ""
    pkcs11_pin: str = field(default="", repr=False)
    pkcs11_key_label: str = ""

    def check(self) -> None:
        """Fail fast on an incomplete KEK configuration."""
        if self.provider not in KEK_PROVIDERS:
            raise ConfigError(f"{ENV_KEYVAULT_KEK_PROVIDER} must be one of {', '.join(KEK_PROVIDERS)}")
        if self.provider == "file" and self.file is None:
            raise ConfigError(f"{ENV_KEYVAULT_KEK_FILE} is required for the file KEK")
        if self.provider == "pkcs11":
            missing = [
                name
                for name, value in (
                    (ENV_KEYVAULT_PKCS11_MODULE, self.pkcs11_module),
                    (ENV_KEYVAULT_PKCS11_TOKEN_LABEL, self.pkcs11_token_label),
                    (ENV_KEYVAULT_PKCS11_PIN, self.pkcs11_pin),
                    (ENV_KEYVAULT_PKCS11_KEY_LABEL, self.pkcs11_key_label),
                )
                if not value
            ]
            if missing:
                raise ConfigError(f"the pkcs11 KEK needs {', '.join(missing)}")


@dataclass(frozen=True)
class KeyvaultConfig:
    """Everything the keyvault needs beyond the common service config."""

    db: str
    kek: KekConfig
    attestation_root: str = "intel"
    dev_root_path: Path | None = None
    db_schema: str = DEFAULT_DB_SCHEMA
    issuer: str = DEFAULT_ISSUER
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    enclave_policy_file: Path | None = None
    collateral_dir: Path | None = None

    @property
    def requires_enclave_policy(self) -> bool:
        """Every root but the local ``dev`` one (Intel's, or a PEM path) needs an enclave policy."""
        return self.attestation_root != DEV_ROOT

    @property
    def uses_postgres(self) -> bool:
        return self.db.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_path(self) -> Path:
        return Path(self.db.removeprefix("sqlite:"))

    @classmethod
    def from_env(cls, data_dir: Path, env: Mapping[str, str] | None = None) -> KeyvaultConfig:
        """Build from the environment; ``data_dir`` is the service's data directory."""
        env = os.environ if env is None else env
        home = data_dir / "keyvault"
        kek = KekConfig(
            provider=env.get(ENV_KEYVAULT_KEK_PROVIDER, "file"),
            file=Path(env.get(ENV_KEYVAULT_KEK_FILE, str(home / "kek.bin"))),
            pkcs11_module=env.get(ENV_KEYVAULT_PKCS11_MODULE, ""),
            pkcs11_token_label=env.get(ENV_KEYVAULT_PKCS11_TOKEN_LABEL, ""),
            pkcs11_pin=secret_setting(env, ENV_KEYVAULT_PKCS11_PIN),
            pkcs11_key_label=env.get(ENV_KEYVAULT_PKCS11_KEY_LABEL, ""),
        )
        try:
            ttl = int(env.get(ENV_KEYVAULT_TOKEN_TTL, str(DEFAULT_TOKEN_TTL_S)))
        except ValueError:
            raise ConfigError(f"{ENV_KEYVAULT_TOKEN_TTL} must be a whole number of seconds") from None
        if env.get(REPLACED_HEAD_POLICY_FILE):
            raise ConfigError(
                f"{REPLACED_HEAD_POLICY_FILE} was replaced by {ENV_KEYVAULT_ENCLAVE_POLICY_FILE}, which "
                "also bounds instance-key releases; rename the variable"
            )
        enclave_policy = env.get(ENV_KEYVAULT_ENCLAVE_POLICY_FILE, "")
        collateral_dir = env.get(ENV_KEYVAULT_COLLATERAL_DIR, "")
        config = cls(
            db=secret_setting(env, ENV_KEYVAULT_DB, str(home / "keyvault.db")),
            kek=kek,
            attestation_root=env.get(ENV_KEYVAULT_ATTESTATION_ROOT, "intel"),
            dev_root_path=data_dir / "pki" / "sgx-root.pem",
            db_schema=env.get(ENV_KEYVAULT_DB_SCHEMA, DEFAULT_DB_SCHEMA),
            issuer=env.get(ENV_KEYVAULT_ISSUER, DEFAULT_ISSUER),
            token_ttl_s=ttl,
            enclave_policy_file=Path(enclave_policy) if enclave_policy else None,
            collateral_dir=Path(collateral_dir) if collateral_dir else None,
        )
        config.check()
        return config

    def check(self) -> None:
        """Fail fast on a broken invariant."""
        self.kek.check()
        if not self.db:
            raise ConfigError(f"{ENV_KEYVAULT_DB} must not be empty")
        if not self.issuer:
            raise ConfigError(f"{ENV_KEYVAULT_ISSUER} must not be empty")
        if not 0 < self.token_ttl_s <= MAX_TOKEN_LIFETIME_S:
            raise ConfigError(f"{ENV_KEYVAULT_TOKEN_TTL} must be 1..{MAX_TOKEN_LIFETIME_S}")
        if not self.attestation_root:
            raise ConfigError(f"{ENV_KEYVAULT_ATTESTATION_ROOT} must be intel, dev or a PEM path")
        if self.enclave_policy_file is None and self.requires_enclave_policy:
            raise ConfigError(
                f"{ENV_KEYVAULT_ENCLAVE_POLICY_FILE} is required with the attestation root "
                f"{self.attestation_root!r}: name the operator enclave policy (release-policy JSON "
                "describing the state enclave builds trusted with instance keys and commit heads)"
            )
