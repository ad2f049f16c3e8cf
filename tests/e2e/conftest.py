"""A real mesh: `veil up` as a subprocess in a temporary data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from veil.dev.supervisor import await_mesh_up
from veil.services.common.config import DEFAULT_PORTS


@dataclass
class Mesh:
    """A running `veil up` and where to find its files."""

    process: subprocess.Popen[str]
    data_dir: Path

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS['gateway'][0]}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("mesh") / ".veil"
    veil = Path(sys.executable).with_name("veil")
    with subprocess.Popen(
        [str(veil), "up", "--data-dir", str(data_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        try:
            await_mesh_up(process)
            yield Mesh(process, data_dir)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
