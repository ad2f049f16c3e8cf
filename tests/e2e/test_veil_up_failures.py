"""`veil up` fails fast and names the service that did not come up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_up_fails_clearly_when_a_service_cannot_start(tmp_path: Path) -> None:
    data_dir = tmp_path / ".veil"
    env = {
        **os.environ,
        "VEIL_KEYVAULT_TLS_CERT": str(tmp_path / "missing.pem"),
    }  # the first refuses to start
    veil = Path(sys.executable).with_name("veil")
    result = subprocess.run(
        [str(veil), "up", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "keyvault" in result.stderr
    assert "did not come up" in result.stderr
