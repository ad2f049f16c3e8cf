"""Each service reads its own variables (VEIL_<SERVICE>_*); a renamed one stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.services.common.config import (
    DATA_DIR,
    LISTEN,
    RETIRED_NAMES,
    TLS_CERT,
    ConfigError,
    ServiceConfig,
    env_name,
    server_env,
)


def test_one_environment_configures_each_service_by_its_own_names(tmp_path: Path) -> None:
    env = {
        **server_env("keyvault", {LISTEN: "127.0.0.1:7001", DATA_DIR: str(tmp_path / "kv")}),
        **server_env("state", {LISTEN: "127.0.0.1:7002", TLS_CERT: str(tmp_path / "state.pem")}),
    }
    keyvault = ServiceConfig.from_env("keyvault", env)
    state = ServiceConfig.from_env("state", env)
    gateway = ServiceConfig.from_env("gateway", env)
    assert (keyvault.listen, keyvault.data_dir) == ("127.0.0.1:7001", tmp_path / "kv")
    assert keyvault.tls.cert == tmp_path / "kv" / "pki" / "keyvault.pem"  # under its own data dir
    assert (state.listen, state.tls.cert) == ("127.0.0.1:7002", tmp_path / "state.pem")
    assert gateway.listen == "127.0.0.1:50051"  # none of the others' settings reached it
    assert env_name("gateway", LISTEN) == "VEIL_GATEWAY_LISTEN"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("VEIL_LISTEN", "VEIL_<SERVICE>_LISTEN"),
        ("VEIL_KEK_PROVIDER", "VEIL_KEYVAULT_KEK_PROVIDER"),
        ("VEIL_KEYVAULT_ADDR", "VEIL_STATE_KEYVAULT_ADDR and VEIL_GATEWAY_KEYVAULT_ADDR"),
        ("VEIL_ENCLAVE_MODE", "VEIL_STATE_ENCLAVE_MODE"),
    ],
)
def test_a_renamed_variable_stops_every_service_and_names_its_replacement(old: str, new: str) -> None:
    assert RETIRED_NAMES[old] == new
    for service in ("keyvault", "state", "gateway"):
        with pytest.raises(ConfigError, match=f"{old} is now {new}"):
            ServiceConfig.from_env(service, {old: "anything"})
