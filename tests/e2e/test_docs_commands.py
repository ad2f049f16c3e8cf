"""Every command in README.md and veil/sdk/README.md, as written, against a real `veil up`.

Each fenced block is read from the files: shell lines must each be run here (or by
tests/e2e/test_cli_apps.py, which runs README.md's `veil` and `grpcurl` lines in order) or be
listed in NOT_RUN with the reason, so a command added to a README without a test fails
`test_every_documented_command_is_accounted_for`. Python blocks run as written in a directory
whose `.veil` holds the mesh's PKI, policy and the identities the walk-through made.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Mesh

DOCS = (REPO_ROOT / "README.md", REPO_ROOT / "veil" / "sdk" / "README.md")
VEIL = Path(sys.executable).with_name("veil")
#: Lines that start the mesh or the whole suite: `veil up` (what `make run` runs) is this
#: module's fixture, and the suite is what runs this test.
NOT_RUN = {"make run": "starts the mesh: the fixture runs `veil up`", "make test": "runs this suite"}
#: Who runs which lines.
RUN_ELSEWHERE = {
    "veil ": "tests/e2e/test_cli_apps.py::test_walkthrough_commands_run_as_documented",
    "grpcurl ": "tests/e2e/test_cli_apps.py::test_walkthrough_grpcurl_commands_run",
}
RUN_HERE = ("source .venv/bin/activate", "node clients/node/transfer.mjs")


def blocks(language: str) -> list[tuple[Path, str]]:
    """Every fenced block in the docs of `language` ("shell": bash, sh or none)."""
    found = []
    for doc in DOCS:
        for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", doc.read_text(), flags=re.S | re.M):
            if (language == "shell" and tag in ("bash", "sh", "")) or tag == language:
                found.append((doc, body))
    return found


def shell_lines() -> list[tuple[Path, str]]:
    """Logical lines (backslash continuations joined), comments and blanks dropped."""
    lines = []
    for doc, body in blocks("shell"):
        for line in body.replace("\\\n", " ").splitlines():
            text = line.split("  #")[0].strip()
            if text and not text.startswith("#"):
                lines.append((doc, " ".join(text.split())))
    return lines


def test_every_documented_command_is_accounted_for() -> None:
    unaccounted = [
        f"{doc.relative_to(REPO_ROOT)}: {line}"
        for doc, line in shell_lines()
        if not line.startswith((*NOT_RUN, *RUN_ELSEWHERE, *RUN_HERE))
    ]
    assert unaccounted == [], "documented commands no test runs (add them here or to NOT_RUN)"
    assert len(blocks("python")) >= 2


def test_activate_puts_veil_and_grpcurl_on_the_path() -> None:
    """The quick start's `source .venv/bin/activate`, in a login-free shell, from the root."""
    (line,) = {line for _, line in shell_lines() if line.startswith("source ")}
    done = subprocess.run(
        ["bash", "-c", f"{line} && command -v veil && command -v grpcurl"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = done.stdout.split()
    assert [Path(p).parent.name for p in found] == ["bin", "bin"]
    assert all(".venv" in p for p in found)


@pytest.fixture(scope="module")
def walked(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose .veil is the mesh's PKI and policy, with alice and bob and a funded
    `coins` instance (the README's token walk-through, through the real CLI)."""
    root = tmp_path_factory.mktemp("docs")
    data = root / ".veil"
    shutil.copytree(mesh.data_dir / "pki", data / "pki")
    shutil.copy(mesh.data_dir / "expected-measurement.json", data)
    for argv in (
        ["identity", "new", "treasury"],
        ["identity", "new", "alice"],
        ["identity", "new", "bob"],
        ["instance", "create", "coins", "--app", "token", "--as", "treasury"],
        ["token", "mint", "coins", "alice", "100", "--as", "treasury"],
    ):
        done = subprocess.run(
            [str(VEIL), *argv], cwd=root, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            pytest.fail(f"veil {shlex.join(argv)}: {done.stderr}")
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_blocks_run_as_written(walked: Path, index: int) -> None:
    doc, code = blocks("python")[index]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=walked, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{doc.name} python block {index}:\n{code}\n{done.stderr}"
    assert "Traceback" not in done.stderr


@pytest.mark.e2e
def test_node_command_runs_as_written(walked: Path) -> None:
    lines = [line for _, line in shell_lines() if line.startswith("node ")]
    assert lines, "veil/sdk/README.md shows the Node.js client"
    if shutil.which("node") is None or not (REPO_ROOT / "clients/node/node_modules").is_dir():
        pytest.skip("node or clients/node/node_modules missing (make setup installs them)")
    for line in lines:
        command = line.replace("node clients/node/", f"node {REPO_ROOT}/clients/node/", 1)
        done = subprocess.run(
            ["bash", "-c", command], cwd=walked, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
