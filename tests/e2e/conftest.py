"""A real mesh: `veil up` as a subprocess in a temporary data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from veil.dev.supervisor import await_mesh_up, mesh_ports, port_free
from veil.services.common.config import DEFAULT_PORTS


@dataclass
class Mesh:
    """A running `veil up` and where to find its files."""

    process: subprocess.Popen[str]
    data_dir: Path

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS['gateway'][0]}"


#: The default ports lie in Linux's ephemeral range (32768-60999), so an earlier test's outgoing
#: connection can hold one, and once closed keep it in TIME_WAIT for 60 s: `veil up` then fails
#: with "cannot listen" (a red CI run). The fixture waits for the ports and retries such a start
#: (a port taken between the wait and the bind); any other failure is not retried.
START_ATTEMPTS = 3
PORTS_FREE_TIMEOUT_S = 65.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for attempt in range(1, START_ATTEMPTS + 1):
        data_dir = tmp_path_factory.mktemp("mesh") / ".veil"
        _await_ports_free(mesh_ports(0), PORTS_FREE_TIMEOUT_S)
        process = _start_veil_up(data_dir)
        try:
            await_mesh_up(process)
        except RuntimeError:
            _stop(process)
            if attempt == START_ATTEMPTS or not _could_not_listen(data_dir):
                raise
            continue
        try:
            yield Mesh(process, data_dir)
        finally:
            _stop(process)
        return


def _start_veil_up(data_dir: Path) -> subprocess.Popen[str]:
    veil = Path(sys.executable).with_name("veil")
    return subprocess.Popen(
        [str(veil), "up", "--data-dir", str(data_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def _could_not_listen(data_dir: Path) -> bool:
    """Whether a service of the failed start logged that its port was taken."""
    return any("cannot listen on" in log.read_text() for log in (data_dir / "logs").glob("*.log"))


def _await_ports_free(ports: list[int], timeout: float) -> None:
    """Wait until each port can be bound the way the services bind it (SO_REUSEADDR, so a closed
    connection's TIME_WAIT does not count); a port still held at the deadline is left for the
    start to report."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while not port_free(port, as_servers_bind=True) and time.monotonic() < deadline:
            time.sleep(0.2)
