"""Generated code must match the protos: stale generated code fails `make test`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts/gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_committed_generated_code_is_fresh() -> None:
    result = _check(REPO_ROOT)
    assert result.returncode == 0, result.stderr


def test_stale_generated_code_fails_the_check(tmp_path: Path) -> None:
    for part in ("protos", "scripts", "enclave/v1", "veil/gateway", "veil/keyvault", "veil/state"):
        shutil.copytree(REPO_ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    proto = tmp_path / "protos/veil/state/v1/state.proto"
    proto.write_text(
        proto.read_text().replace(
            "bytes payload = 1;\n}", "bytes payload = 1;\n  // extra\n  bool x = 2;\n}", 1
        )
    )
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "stale: state_pb2.py" in result.stderr
