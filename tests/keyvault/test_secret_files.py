"""Secrets from files, not the environment (issue 17, item 9): the PKCS#11 PIN and database URLs.

`NAME_FILE` names a file read once at start; a file other users may read (or anyone but its
owner may change) is refused before anything opens, like a TLS key. The keyvault below runs on
a real SoftHSM token whose PIN, and a database whose location, it read from such files.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from veil.keyvault.v1 import keyvault_pb2
from veil.services.common.config import ConfigError, ServiceConfig, read_secret_file, secret_setting
from veil.services.keyvault.config import KeyvaultConfig
from veil.services.state.config import StateConfig

from .support import SoftHsm, keyvault_stub, policy_json, write_sim_enclave_policy


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_keyvault_runs_on_a_pin_and_a_database_read_from_files(
    softhsm: SoftHsm,
    tmp_path: Path,
    pki_dir: Path,
    service_config: Callable[[str], ServiceConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", str(softhsm.config))
    database = tmp_path / "kv" / "from-file.db"
    database.parent.mkdir()
    env = {
        "VEIL_KEYVAULT_ATTESTATION_ROOT": str(pki_dir / "sgx-root.pem"),
        "VEIL_KEYVAULT_ENCLAVE_POLICY_FILE": str(write_sim_enclave_policy(tmp_path / "policy.json")),
        "VEIL_KEYVAULT_KEK_PROVIDER": "pkcs11",
        "VEIL_KEYVAULT_PKCS11_MODULE": softhsm.module,
        "VEIL_KEYVAULT_PKCS11_TOKEN_LABEL": softhsm.token_label,
        "VEIL_KEYVAULT_PKCS11_PIN_FILE": str(_secret(tmp_path / "pin", softhsm.pin + "\n", 0o440)),
        "VEIL_KEYVAULT_PKCS11_KEY_LABEL": f"kek-{uuid.uuid4().hex[:12]}",
        "VEIL_KEYVAULT_DB_FILE": str(_secret(tmp_path / "db-url", str(database))),
    }
    config = KeyvaultConfig.from_env(tmp_path / "kv", env=env)
    assert config.kek.pkcs11_pin == softhsm.pin  # the trailing newline of `echo PIN > file` dropped
    assert softhsm.pin not in repr(config)
    with keyvault_stub(service_config("keyvault"), config, pki_dir, "admin") as admin:
        policy = policy_json({"claim": "x-ms-sgx-is-debuggable", "equals": False})
        created = admin.CreateKey(
            keyvault_pb2.CreateKeyRequest(key_name="orders", release_policy_json=policy)
        )
    assert created.key.latest_version == 1
    assert database.is_file()  # the database the file named, not the default


def test_a_pin_file_others_may_read_is_refused_at_start(softhsm: SoftHsm, tmp_path: Path) -> None:
    pin = _secret(tmp_path / "pin", softhsm.pin, 0o644)
    env = {"VEIL_KEYVAULT_KEK_PROVIDER": "pkcs11", "VEIL_KEYVAULT_PKCS11_PIN_FILE": str(pin)}
    with pytest.raises(ConfigError, match=r"VEIL_KEYVAULT_PKCS11_PIN_FILE.*0644") as refused:
        KeyvaultConfig.from_env(tmp_path, env=env)
    assert softhsm.pin not in str(refused.value)


def test_the_state_reads_its_database_url_from_a_file(tmp_path: Path, pki_dir: Path) -> None:
    service = ServiceConfig.from_env("state", {"VEIL_STATE_DATA_DIR": str(tmp_path)})
    url = "postgresql://state:s3cret@db.internal:5432/state"
    env = {"VEIL_STATE_ENCLAVE_MODE": "sim", "VEIL_STATE_DB_FILE": str(_secret(tmp_path / "url", url))}
    assert StateConfig.from_env(service, env).database == url
    with pytest.raises(ConfigError, match="VEIL_STATE_DB or VEIL_STATE_DB_FILE"):
        StateConfig.from_env(service, {**env, "VEIL_STATE_DB": url})
    (tmp_path / "url").chmod(0o660)  # group-writable: someone else could point it elsewhere
    with pytest.raises(ConfigError, match="0660"):
        StateConfig.from_env(service, env)


def test_the_plain_variable_still_works_for_development() -> None:
    assert secret_setting({"VEIL_STATE_DB": "/tmp/x.db"}, "VEIL_STATE_DB") == "/tmp/x.db"
    assert secret_setting({}, "VEIL_STATE_DB", "default") == "default"


def test_a_mounted_secret_is_read_through_its_symlinks(tmp_path: Path) -> None:
    # Kubernetes mounts a Secret key as NAME -> ..data/NAME -> ..<timestamp>/NAME.
    data = tmp_path / "..2026_12_04" / "pin"
    data.parent.mkdir()
    _secret(data, "1234", 0o440)
    (tmp_path / "..data").symlink_to(data.parent.name)
    (tmp_path / "pin").symlink_to(Path("..data") / "pin")
    assert read_secret_file(tmp_path / "pin", "X_FILE") == "1234"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: _secret(d / "s", ""), "empty"),
        (lambda d: d, "Is a directory"),
        (lambda d: d / "missing", "cannot read"),
        (lambda d: _secret(d / "s", "x", 0o604), "0604"),
    ],
)
def test_unusable_secret_files_are_refused(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_secret_file(make(tmp_path), "X_FILE")
