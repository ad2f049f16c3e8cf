"""`veil up`'s wiring for TCB evaluation: the keyvault gets the dev collateral, the policy its JWKS.

A real keyvault server (in process, at the port a mesh shifted by a free offset would use)
answers the admin's GetJwks, as it does for `veil up`; no enclave is needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import tls_for
from veil.dev.pki import collateral_dir
from veil.dev.policies import write_dev_policy
from veil.dev.supervisor import Mesh, await_mesh_up, free_port_offset, keyvault_pins, keyvault_release_key
from veil.sdk.trust_policy import POLICY_FILE, load_policy
from veil.services.common.config import DEFAULT_PORTS, ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.keyvault.config import ENV_KEYVAULT_COLLATERAL_DIR, KekConfig, KeyvaultConfig
from veil.services.keyvault.server import create_server


def test_the_mesh_starts_the_keyvault_with_the_dev_collateral(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, port_offset=free_port_offset())
    keyvault = next(service for service in mesh.services if service.name == "keyvault")
    assert keyvault.env[ENV_KEYVAULT_COLLATERAL_DIR] == str(collateral_dir(tmp_path / "pki"))


@pytest.fixture
def keyvault_at_offset(pki_dir: Path, tmp_path: Path) -> Iterator[tuple[VeilServer, int]]:
    offset = free_port_offset()
    config = ServiceConfig(
        service="keyvault",
        listen=f"127.0.0.1:{DEFAULT_PORTS['keyvault'][0] + offset}",
        admin_listen="127.0.0.1:0",
        tls=tls_for(pki_dir, "keyvault"),
        data_dir=tmp_path / "keyvault",
        grace_seconds=1.0,
    )
    keyvault_config = KeyvaultConfig(
        db=str(tmp_path / "kv" / "keyvault.db"),
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root="dev",
        dev_root_path=pki_dir / "sgx-root.pem",
        collateral_dir=collateral_dir(pki_dir),
    )
    server, _ = create_server(config, keyvault_config=keyvault_config)
    server.start()
    yield server, offset
    server.stop(0)


def test_veil_up_pins_the_keyvaults_jwks_in_the_dev_policy(
    keyvault_at_offset: tuple[VeilServer, int], pki_dir: Path, tmp_path: Path
) -> None:
    _, offset = keyvault_at_offset
    data_dir = pki_dir.parent  # the dev PKI lives in <data dir>/pki
    pins = keyvault_pins(data_dir, offset)
    assert pins.release_key == keyvault_release_key(data_dir, offset)
    assert pins.jwks["keys"], "the keyvault has a token-signing key from the start"
    # What `up` does once the mesh is SERVING:
    path = write_dev_policy(tmp_path, pins.release_key, pins.jwks)
    assert path == tmp_path / POLICY_FILE
    written = json.loads(path.read_text())
    assert written["jwks"] == pins.jwks
    assert "Unevaluated" not in written["accepted_tcb_statuses"]
    policy = load_policy(path)
    assert (policy.jwks, policy.keyvault_release_key) == (pins.jwks, pins.release_key)


def test_a_mesh_that_never_comes_up_says_why() -> None:
    """`veil up` exiting early: the error carries its last lines (which service, which log), not
    only the exit status (a port already in use showed up in CI as a bare "exited with 1")."""
    said = "print('starting gateway'); print('gateway did not become SERVING: see logs/gateway.log')"
    with (
        subprocess.Popen(
            [sys.executable, "-c", f"{said}; raise SystemExit(1)"], stdout=subprocess.PIPE, text=True
        ) as process,
        pytest.raises(RuntimeError, match="exited with 1") as failed,
    ):
        await_mesh_up(process)
    assert "gateway did not become SERVING: see logs/gateway.log" in str(failed.value)
