"""Item 2 of issue 14 against a real `veil up`: after the state service restarts (new enclave
keys), `veil ballot verify-receipt` verifies a vote receipt under the earlier boot's key only
because this client attested that key when it voted, says so, and refuses the same receipt with
one altered signature byte, or on a client that never attested the earlier key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Mesh
from tests.e2e.test_veil_up import _child_pid
from veil.services.common.channels import wait_until_serving
from veil.services.common.config import DEFAULT_PORTS

pytestmark = pytest.mark.e2e

VEIL = Path(sys.executable).with_name("veil")


def _veil(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VEIL), *argv], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )


def _ok(root: Path, *argv: str) -> str:
    done = _veil(root, *argv)
    assert done.returncode == 0, f"veil {' '.join(argv)}: {done.stderr}"
    return done.stdout


def _restart_state(mesh: Mesh) -> None:
    before = _child_pid(mesh, "state")
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if _child_pid(mesh, "state") != before:
                break
        except AssertionError:
            pass
        time.sleep(0.3)
    wait_until_serving(f"127.0.0.1:{DEFAULT_PORTS['state'][1]}", label="state", timeout=30)


def test_receipts_of_an_earlier_boot(mesh: Mesh, tmp_path: Path) -> None:
    root = tmp_path / "voter"
    shutil.copytree(mesh.data_dir / "pki", root / ".veil" / "pki")
    shutil.copy(mesh.data_dir / "expected-measurement.json", root / ".veil")
    for name in ("clerk", "v1", "v2", "v3"):
        _ok(root, "identity", "new", name)
    _ok(root, "instance", "create", "restart-polls", "--app", "ballot")
    voters = [a for v in ("v1", "v2", "v3") for a in ("--voter", v)]
    _ok(
        root,
        "ballot",
        "create",
        "restart-polls",
        "b",
        "--question",
        "q",
        "--option",
        "y",
        "--option",
        "n",
        *voters,
        "--as",
        "clerk",
    )
    saved = {
        v: json.loads(_ok(root, "ballot", "vote", "restart-polls", "b", "y", "--as", v, "--json"))["saved"]
        for v in ("v1", "v2", "v3")
    }
    _ok(root, "ballot", "close", "restart-polls", "b", "--as", "clerk")
    assert "under the attested enclave key" in _ok(
        root, "ballot", "verify-receipt", "restart-polls", "b", "--as", "v1"
    )

    _restart_state(mesh)

    out = _ok(root, "ballot", "verify-receipt", "restart-polls", "b", "--as", "v1")
    assert "the key of an earlier boot of the enclave, which this client attested on" in out
    document = json.loads(_ok(root, "ballot", "verify-receipt", "restart-polls", "b", "--as", "v2", "--json"))
    assert document["vote_receipt_signature"] == "valid under an earlier attested key"

    altered = json.loads((root / saved["v3"]).read_text())
    raw = bytearray(bytes.fromhex(altered["receipt"]))
    raw[-1] ^= 1  # the signature is the receipt's last field
    altered["receipt"] = raw.hex()
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(altered))
    done = _veil(
        root, "ballot", "verify-receipt", "restart-polls", "b", "--receipt", str(forged), "--as", "v3"
    )
    assert done.returncode == 1
    assert "could NOT be verified" in done.stderr or "NOT this vote's" in done.stderr
    assert done.stdout == ""

    # A client that never attested the earlier key cannot call the receipt verified.
    (root / ".veil" / "attested-keys.json").unlink()
    done = _veil(root, "ballot", "verify-receipt", "restart-polls", "b", "--as", "v1")
    assert done.returncode == 1
    assert "could NOT be verified" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
