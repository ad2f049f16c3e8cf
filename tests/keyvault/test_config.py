"""Keyvault configuration from the environment, and wiring it (SoftHSM2 KEK, PostgreSQL store)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from veil.services.common.config import ConfigError
from veil.services.keyvault.app import open_keyvault
from veil.services.keyvault.config import KekConfig, KeyvaultConfig
from veil.services.keyvault.store_postgres import PostgresStore
from veil.verify.roots import RootError

from .support import POSTGRES_DSN, SoftHsm, dev_keyvault_config, write_sim_enclave_policy


def test_defaults_live_under_the_data_dir(tmp_path: Path) -> None:
    policy = tmp_path / "enclave-policy.json"
    config = KeyvaultConfig.from_env(tmp_path, env={"VEIL_KEYVAULT_ENCLAVE_POLICY_FILE": str(policy)})
    assert config.sqlite_path == tmp_path / "keyvault" / "keyvault.db"
    assert config.kek == KekConfig(provider="file", file=tmp_path / "keyvault" / "kek.bin")
    assert config.attestation_root == "intel"  # sim quotes are refused unless dev is chosen
    assert config.issuer == "spiffe://veil/keyvault"
    assert config.token_ttl_s == 600
    assert config.enclave_policy_file == policy
    assert not config.uses_postgres


@pytest.mark.parametrize("root", ["intel", "/etc/veil/sgx-root.pem"])
def test_a_production_root_without_an_enclave_policy_refuses_to_start(tmp_path: Path, root: str) -> None:
    env = {} if root == "intel" else {"VEIL_KEYVAULT_ATTESTATION_ROOT": root}
    with pytest.raises(ConfigError, match="VEIL_KEYVAULT_ENCLAVE_POLICY_FILE is required"):
        KeyvaultConfig.from_env(tmp_path, env=env)
    # A config built without from_env is checked when the keyvault opens, before anything else.
    config = KeyvaultConfig(
        db=str(tmp_path / "kv" / "keyvault.db"),
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root=root,
    )
    with pytest.raises(ConfigError, match="VEIL_KEYVAULT_ENCLAVE_POLICY_FILE is required"):
        open_keyvault(config)
    assert not (tmp_path / "kv").exists(), "nothing was opened or created"


def test_an_invalid_enclave_policy_file_refuses_to_start(tmp_path: Path, pki_dir: Path) -> None:
    policy = tmp_path / "enclave-policy.json"
    policy.write_text('{"version": "1.0.0", "anyOf": []}')
    config = KeyvaultConfig(
        db=str(tmp_path / "kv" / "keyvault.db"),
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=policy,
    )
    with pytest.raises(
        ConfigError, match=r"VEIL_KEYVAULT_ENCLAVE_POLICY_FILE \(.*\) is not a valid release policy"
    ):
        open_keyvault(config)
    with pytest.raises(ConfigError, match="cannot be read"):
        open_keyvault(replace(config, enclave_policy_file=tmp_path / "missing.json"))


def test_a_dev_keyvault_starts_without_an_enclave_policy_and_trusts_no_enclave(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = dev_keyvault_config(tmp_path / "kv", pki_dir)
    keyvault = open_keyvault(config)
    try:
        assert not keyvault.enclave_policy.configured
        refusal = keyvault.enclave_policy.refusal({"iss": config.issuer})
        assert refusal is not None
        assert refusal.reason == "ENCLAVE_POLICY_NOT_CONFIGURED"
    finally:
        keyvault.close()
    with_policy = replace(config, enclave_policy_file=write_sim_enclave_policy(tmp_path / "policy.json"))
    keyvault = open_keyvault(with_policy)
    try:
        assert keyvault.enclave_policy.configured
    finally:
        keyvault.close()


def test_environment_overrides(tmp_path: Path) -> None:
    config = KeyvaultConfig.from_env(
        tmp_path,
        env={
            "VEIL_KEYVAULT_DB": "postgresql://kv@db/keyvault",
            "VEIL_KEYVAULT_DB_SCHEMA": "kv_prod",
            "VEIL_KEYVAULT_ATTESTATION_ROOT": "dev",
            "VEIL_KEYVAULT_KEK_PROVIDER": "pkcs11",
            "VEIL_KEYVAULT_PKCS11_MODULE": "/usr/lib/softhsm/libsofthsm2.so",
            "VEIL_KEYVAULT_PKCS11_TOKEN_LABEL": "veil",
            "VEIL_KEYVAULT_PKCS11_PIN": "secret-pin",
            "VEIL_KEYVAULT_PKCS11_KEY_LABEL": "veil-kek",
            "VEIL_KEYVAULT_TOKEN_TTL_SECONDS": "120",
        },
    )
    assert config.uses_postgres
    assert config.db_schema == "kv_prod"
    assert config.kek.provider == "pkcs11"
    assert config.token_ttl_s == 120
    assert "secret-pin" not in repr(config)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VEIL_KEYVAULT_KEK_PROVIDER": "vault"}, "VEIL_KEYVAULT_KEK_PROVIDER"),
        (
            {"VEIL_KEYVAULT_KEK_PROVIDER": "pkcs11", "VEIL_KEYVAULT_PKCS11_MODULE": "/x.so"},
            "VEIL_KEYVAULT_PKCS11_PIN",
        ),
        ({"VEIL_KEYVAULT_TOKEN_TTL_SECONDS": "ten"}, "whole number"),
        ({"VEIL_KEYVAULT_TOKEN_TTL_SECONDS": "0"}, "VEIL_KEYVAULT_TOKEN_TTL_SECONDS"),
        ({"VEIL_KEYVAULT_ATTESTATION_ROOT": ""}, "VEIL_KEYVAULT_ATTESTATION_ROOT"),
        ({"VEIL_KEYVAULT_HEAD_POLICY_FILE": "/x.json"}, "replaced by VEIL_KEYVAULT_ENCLAVE_POLICY_FILE"),
    ],
)
def test_broken_configuration_fails_fast(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KeyvaultConfig.from_env(tmp_path, env=env)


def test_missing_dev_root_fails_at_start(tmp_path: Path) -> None:
    config = KeyvaultConfig.from_env(tmp_path, env={"VEIL_KEYVAULT_ATTESTATION_ROOT": "dev"})
    with pytest.raises(RootError):
        open_keyvault(config)


@pytest.mark.postgres
def test_open_with_pkcs11_kek_and_postgres(softhsm: SoftHsm, pki_dir: Path, tmp_path: Path) -> None:
    schema = f"kvtest_{uuid.uuid4().hex[:16]}"
    config = KeyvaultConfig(
        db=POSTGRES_DSN,
        db_schema=schema,
        kek=KekConfig(
            provider="pkcs11",
            pkcs11_module=softhsm.module,
            pkcs11_token_label=softhsm.token_label,
            pkcs11_pin=softhsm.pin,
            pkcs11_key_label=f"kek-{uuid.uuid4().hex[:8]}",
        ),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=write_sim_enclave_policy(tmp_path / "enclave-policy.json"),
    )
    keyvault = open_keyvault(config)
    try:
        assert keyvault.kek.provider == "pkcs11"
        assert keyvault.store.backend == "postgres"
        assert len(keyvault.ring.jwks()["keys"]) == 1  # a signing key, wrapped inside the HSM
        keyvault.keys.create(
            "orders",
            '{"version":"1.0.0","anyOf":[{"authority":"spiffe://veil/keyvault",'
            '"allOf":[{"claim":"x-ms-sgx-svn","greaterOrEquals":1}]}]}',
            caller="spiffe://veil/admin",
        )
        assert keyvault.keys.get("orders").latest_version == 1
    finally:
        keyvault.close()
        cleanup = PostgresStore(POSTGRES_DSN, schema=schema)
        cleanup.drop_schema()
        cleanup.close()
