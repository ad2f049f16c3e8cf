"""deploy/k8s/README.md's image and attestation commands, run as written against the image and the
mesh run from it; only the variables a reader sets (image, addresses, root) are replaced."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.image.conftest import VEIL, ContainerMesh, Image
from veil.dev.policies import dev_enclave_policy_json
from veil.enclave.providers.sim_quote import DEV_MRSIGNER

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

README = REPO_ROOT / "deploy" / "k8s" / "README.md"
MARKER = "<!-- test: tests/image/test_readme.py"


def marked_blocks() -> list[str]:
    """The ```sh blocks the README marks as run by this test, in order."""
    blocks = re.findall(re.escape(MARKER) + r"[^\n]*\n```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3, "the README's tested blocks changed: update this test"
    return blocks


def run(block: str, cwd: Path, **variables: str) -> str:
    """Run a README block with bash, each `NAME=...` line the reader edits set to our value."""
    for name, value in variables.items():
        block, count = re.subn(rf"^{name}=.*$", f"{name}={value}", block, flags=re.M)
        assert count == 1, f"the block sets {name} {count} times"
    path = os.pathsep.join([str(VEIL.parent), os.environ.get("PATH", "")])
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],  # bash from PATH, as a reader runs it
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PATH": path},
    )
    assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_reading_the_sim_measurement_from_the_image(image: Image, tmp_path: Path) -> None:
    out = run(marked_blocks()[0], tmp_path, IMAGE=image.tag)
    assert out.split() == [image.mrenclave.hex()]
    policy = dev_enclave_policy_json(image.mrenclave, DEV_MRSIGNER)
    assert (tmp_path / "enclave-policy.json").read_text() == policy


def client_dir(mesh: ContainerMesh, tmp_path: Path) -> Path:
    """What a reader has: the CA and admin files, the protos, and (sim) the dev PKI for the root."""
    pki = mesh.data_dir / "pki"
    for name in ("ca.pem", "admin.pem", "admin-key.pem"):
        shutil.copyfile(pki / name, tmp_path / name)
    (tmp_path / "protos").symlink_to(REPO_ROOT / "protos")
    (tmp_path / ".veil").symlink_to(mesh.data_dir)
    return tmp_path


def test_verifying_attestation_from_outside(container_mesh: ContainerMesh, tmp_path: Path) -> None:
    cwd = client_dir(container_mesh, tmp_path)
    out = run(marked_blocks()[1], cwd, GW=container_mesh.public_gateway, ROOT='"dev --data-dir .veil"')
    assert f'"mrenclave": "{container_mesh.mrenclave.hex()}"' in out.replace('":"', '": "')
    assert out.rstrip().endswith("report data binds runtime_data and the nonce")


def test_admin_calls_on_the_mtls_port(container_mesh: ContainerMesh, tmp_path: Path) -> None:
    cwd = client_dir(container_mesh, tmp_path)
    out = run(marked_blocks()[2], cwd, ADMIN=container_mesh.gateway)
    assert "veil.gateway.v1.GatewayService" in out.split()
    assert int(out.split()[-1]) > 0, "runtime_data is empty or missing"
