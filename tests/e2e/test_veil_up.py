"""`veil up` end to end: deploy order, supervision, clean stop, and the README's grpcurl commands."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Mesh
from veil.services.common.channels import health_status, wait_until_serving
from veil.services.common.config import DEFAULT_PORTS

pytestmark = pytest.mark.e2e


def _readme_grpcurl_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("grpcurl ")
    ]


def test_readme_grpcurl_commands_run_against_the_mesh(mesh: Mesh) -> None:
    commands = _readme_grpcurl_commands()
    assert len(commands) >= 3, "the README shows how to call the mesh with grpcurl"
    grpcurl = Path(sys.executable).with_name("grpcurl")
    outputs = []
    for command in commands:
        argv = [a.replace(".veil/", f"{mesh.data_dir}/") for a in shlex.split(command)]
        argv[0] = str(grpcurl)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        outputs.append(result.stdout)
    listing = outputs[0]
    assert "veil.gateway.v1.GatewayService" in listing
    assert "grpc.health.v1.Health" in listing


def test_grpcurl_without_client_certificate_is_refused(mesh: Mesh) -> None:
    grpcurl = Path(sys.executable).with_name("grpcurl")
    result = subprocess.run(
        [str(grpcurl), "-cacert", str(mesh.data_dir / "pki/ca.pem"), mesh.gateway, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0


def _child_pid(mesh: Mesh, service: str) -> int:
    """The pid of this fixture's `python -m veil.services.SERVICE` (a child of its `veil up`, never
    another mesh's: a machine-wide pgrep once SIGKILLed other meshes' services)."""
    tasks = Path(f"/proc/{mesh.process.pid}/task")
    for pid in (int(p) for task in tasks.iterdir() for p in (task / "children").read_text().split()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if argv[-3:-1] == [b"-m", f"veil.services.{service}".encode()]:
            return pid
    raise AssertionError(f"no {service} process")


def test_crashed_service_is_restarted(mesh: Mesh) -> None:
    admin = f"127.0.0.1:{DEFAULT_PORTS['state'][1]}"
    before = _child_pid(mesh, "state")
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (
                _child_pid(mesh, "state") != before
                and health_status(admin) == health_pb2.HealthCheckResponse.SERVING
            ):
                break
        except (AssertionError, Exception):  # down while restarting
            pass
        time.sleep(0.3)
    wait_until_serving(admin, label="state", timeout=5)
    assert _child_pid(mesh, "state") != before
