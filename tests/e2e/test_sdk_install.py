"""`pip install veil` (no extras) gives the SDK alone: one import name, light dependencies.

Built and installed for real, offline: the wheel is built from a copy of the source tree
(`pip wheel --no-build-isolation`, so the build needs no index); a fresh virtualenv gets the
base dependencies' closure, computed from the wheel's own `Requires-Dist` (no extra), as links
to the distributions this test environment already has installed (RECORD file by file, so
`pip check` sees them as installed and nothing else is there), then `pip install --no-deps
--no-index` installs the wheel. In that virtualenv the SDK imports, the `veil` command runs,
the servers' packages are absent, operator nouns say they need `veil[server]`, and `veil token
balance` works against a real mesh. Installing from the package index instead (`pip install
dist/veil-*.whl` in a fresh virtualenv) gives the same set of packages; the README shows it.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Mesh

pytestmark = pytest.mark.e2e

#: What the SDK, the CLI and the verification library need; nothing else.
BASE = {
    "grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "cryptography", "pyjwt", "jsonschema",
}  # fmt: skip
#: Modules only the servers need (psycopg, python-pkcs11, opentelemetry-sdk, ...).
SERVER_ONLY = ("psycopg", "pkcs11", "opentelemetry", "grpc_health", "grpc_reflection", "tenacity", "yaml")
SOURCES = ("pyproject.toml", "README.md", "veil", "enclave", "services")
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "node_modules")
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(  # our interpreter, building our own source
        [*PIP_WHEEL, "--wheel-dir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("veil-*.whl")
    return built


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    found = [
        Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")
    ]
    return [r for r in found if r.marker is None or r.marker.evaluate({"extra": ""})]


def _closure(requirements: list[Requirement]) -> set[str]:
    """The installed distributions these requirements pull in, without any extra."""
    seen: set[str] = set()
    queue = [r.name for r in requirements]
    while queue:
        name = canonicalize_name(queue.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    return seen


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    venv = tmp_path_factory.mktemp("sdk") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = Path(sysconfig.get_path("purelib")).resolve()
    for name in _closure(_requirements(wheel)):
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            located = Path(str(dist.locate_file(file))).resolve()
            if not located.is_relative_to(ours) or "__pycache__" in located.parts:
                continue  # scripts in bin/, caches
            link = site / located.relative_to(ours)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(located)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )
    return venv


def _run(venv: Path, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # the test's own virtualenv
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or venv,
        check=False,
    )


def test_the_wheel_installs_one_import_name_and_needs_only_the_sdk_dependencies(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"veil"}
    assert {canonicalize_name(r.name) for r in _requirements(wheel)} == BASE


def test_the_sdk_alone_imports_and_runs(sdk_venv: Path) -> None:
    checked = _run(sdk_venv, "python", "-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    program = (
        "import importlib.util, sys\n"
        "import veil\n"
        "from veil import connect, AttestationError, VeilClient\n"
        "from veil.errors import VeilClientError\n"
        "import veil.verify, veil.cli.main\n"
        f"missing = [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m) is None]\n"
        "print(' '.join(missing))\n"
    )
    result = _run(sdk_venv, "python", "-c", program)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == list(SERVER_ONLY), "a server package is installed"
    listing = _run(sdk_venv, "python", "-m", "pip", "list", "--format=freeze")
    installed = {canonicalize_name(line.split("==")[0]) for line in listing.stdout.splitlines()}
    assert not installed & {"psycopg", "python-pkcs11", "opentelemetry-sdk"}
    helped = _run(sdk_venv, "veil", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "token" in helped.stdout


def test_operator_nouns_say_they_need_the_server_extra(sdk_venv: Path, tmp_path: Path) -> None:
    for argv in (("up", "--data-dir", str(tmp_path)), ("pki", "init", "--data-dir", str(tmp_path))):
        result = _run(sdk_venv, "veil", *argv)
        assert result.returncode == 1
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert "pip install 'veil[server]'" in lines[0]


def test_the_sdk_alone_talks_to_a_real_mesh(sdk_venv: Path, mesh: Mesh) -> None:
    data = ("--data-dir", str(mesh.data_dir))
    for argv in (
        ("identity", "new", "sdk-treasury", *data),
        ("identity", "new", "sdk-bob", *data),
        ("instance", "create", "sdk-coins", "--app", "token", "--as", "sdk-treasury", *data),
        ("token", "mint", "sdk-coins", "sdk-bob", "42", "--as", "sdk-treasury", *data),
    ):
        result = _run(sdk_venv, "veil", *argv)
        assert result.returncode == 0, f"veil {' '.join(argv)}: {result.stderr}"
    balance = _run(sdk_venv, "veil", "token", "balance", "sdk-coins", "--as", "sdk-bob", *data)
    assert balance.returncode == 0, balance.stderr
    assert balance.stdout.split()[0] == "42"
    assert "receipt verified" in balance.stdout
