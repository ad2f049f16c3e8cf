"""Running the Node.js client (clients/node) from the tests: its commands and ES module scripts.

clients/node/node_modules comes from `make setup` (npm ci --prefix clients/node); the tests that
run the client fail, not skip, without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT

NODE_CLIENT = REPO_ROOT / "clients" / "node"
#: The client's own dependencies, as its package.json pins them.
DEPENDENCIES = sorted(json.loads((NODE_CLIENT / "package.json").read_text())["dependencies"])


def node() -> str:
    """The `node` command, once the client's dependencies are installed."""
    found = shutil.which("node")
    assert found, "Node.js is required (the project's set-up installs Node 20)"
    missing = [name for name in DEPENDENCIES if not (NODE_CLIENT / "node_modules" / name).is_dir()]
    assert not missing, (
        f"clients/node/node_modules lacks {missing}: run `make setup` (npm ci --prefix clients/node)"
    )
    return found


def run_node(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`node *args`, its output captured as text; the caller checks the exit status."""
    return subprocess.run(
        [node(), *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def node_eval(script: str) -> Any:
    """Run an ES module script with `veil` = the client library; returns its JSON output."""
    source = f"import * as veil from {json.dumps((NODE_CLIENT / 'veil-client.mjs').as_uri())};\n{script}"
    result = run_node("--input-type=module", "-e", source)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def node_clients(data_dir: Path, address: str, *, timeout_ms: int) -> str:
    """Node source defining `fs`, `dir` (the data dir) and `make()`: a new client on the data dir's
    counters, pins and calls (node-calls/), as a process on that data dir builds one."""
    return f"""const fs = await import("node:fs");
const dir = {json.dumps(str(data_dir))};
const make = () => new veil.VeilNodeClient({json.dumps(address)}, fs.readFileSync(dir + "/pki/ca.pem"), {{
  serverName: "localhost", timeoutMs: {timeout_ms},
  policy: veil.loadPolicy(dir + "/expected-measurement.json"),
  rootPem: fs.readFileSync(dir + "/pki/sgx-root.pem"),
  counters: new veil.FileCounters(dir + "/counters.json"),
  pins: new veil.InstancePins(dir + "/instances.json"),
  calls: new veil.FileCalls(dir + "/node-calls"),
}});
"""
