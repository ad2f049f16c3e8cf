"""The sim overlay's bootstrap-secrets.sh, run for real against a fake `kubectl` on PATH.

The fake records every call, answers `get secret` from a set of Secrets that "exist", keeps what
`create secret generic` would store (literals and file contents) and prints what `--dry-run=client
-o yaml` would, so the test checks what the script gives the cluster: the Secrets the overlay
reads, with fresh values, the operator enclave policy of this checkout, and nothing replaced on a
second run. `openssl`, the `veil` CLI (for `veil pki init`) and Python are the real ones.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sim_quote import DEV_MRSIGNER

from .kube import K8S

SCRIPT = K8S / "overlays" / "sim" / "bootstrap-secrets.sh"
NAMESPACE = "veil-test"

FAKE_KUBECTL = """#!{python}
import json, os, sys
from pathlib import Path

state = Path(os.environ["FAKE_KUBECTL_STATE"])
args = sys.argv[1:]
with (state / "calls.jsonl").open("a") as log:
    log.write(json.dumps(args) + "\\n")
namespace = args[args.index("-n") + 1] if "-n" in args else None
args = [a for i, a in enumerate(args) if a != "-n" and (i == 0 or args[i - 1] != "-n")]
existing = set(os.environ.get("FAKE_KUBECTL_EXISTING", "").split())


def sources(options):
    data = {{}}
    for option in options:
        if option.startswith("--from-literal="):
            key, value = option.removeprefix("--from-literal=").split("=", 1)
            data[key] = value
        elif option.startswith("--from-file="):
            spec = option.removeprefix("--from-file=")
            key, path = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
            data[key] = Path(path).read_bytes().hex()
    return data


if args[:2] == ["get", "secret"]:
    sys.exit(0 if args[2] in existing else 1)
if args[:2] == ["create", "namespace"] or args[:2] == ["create", "configmap"]:
    kind, name = args[1], args[2]
    # The "YAML": like kubectl's, it names the namespace given with -n (if any).
    print(json.dumps({{"kind": kind, "name": name, "namespace": namespace, "data": sources(args[3:])}}))
    sys.exit(0)
if args[:3] == ["create", "secret", "generic"]:
    (state / "secrets").mkdir(exist_ok=True)
    (state / "secrets" / f"{{namespace}}.{{args[3]}}.json").write_text(json.dumps(sources(args[4:])))
    sys.exit(0)
if args[:2] == ["apply", "-f"] and args[2] == "-":
    with (state / "applied.jsonl").open("a") as applied:
        document = json.loads(sys.stdin.read())
        document["namespace"] = namespace or document["namespace"]
        applied.write(json.dumps(document) + "\\n")
    sys.exit(0)
sys.exit(f"fake kubectl: unexpected call {{sys.argv[1:]}}")
"""


def _run(tmp_path: Path, existing: str = "") -> tuple[Path, subprocess.CompletedProcess[str]]:
    state = tmp_path / "kubectl"
    state.mkdir(exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
    bash = shutil.which("bash")
    assert bash is not None
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHON": sys.executable,
        "FAKE_KUBECTL_STATE": str(state),
        "FAKE_KUBECTL_EXISTING": existing,
    }
    done = subprocess.run(  # our script, our fake kubectl
        [bash, str(SCRIPT), NAMESPACE],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return state, done


def _secrets(state: Path) -> dict[str, dict[str, str]]:
    folder = state / "secrets"
    if not folder.exists():
        return {}
    return {p.name.split(".")[1]: json.loads(p.read_text()) for p in folder.glob(f"{NAMESPACE}.*.json")}


def _applied(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "applied.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the script needs openssl")
def test_bootstrap_creates_every_secret_with_fresh_values_and_the_checkouts_policy(tmp_path: Path) -> None:
    state, _ = _run(tmp_path)
    secrets = _secrets(state)
    assert set(secrets) == {"veil-postgresql", "veil-kek", "veil-sim-pki"}

    database = secrets["veil-postgresql"]
    assert set(database) == {
        "admin-password",
        "keyvault-password",
        "state-password",
        "keyvault-url",
        "state-url",
    }
    passwords = [database[f"{who}-password"] for who in ("admin", "keyvault", "state")]
    assert len(set(passwords)) == 3
    assert all(len(p) == 48 for p in passwords)  # 24 random bytes each
    for service in ("keyvault", "state"):
        url = database[f"{service}-url"]
        assert url.startswith(
            f"postgresql://{service}:{database[f'{service}-password']}@postgresql:5432/{service}?"
        )
        assert "sslmode=verify-full" in url

    kek = bytes.fromhex(secrets["veil-kek"]["kek"])
    assert len(kek) == 32
    assert kek != bytes(32)

    pki = secrets["veil-sim-pki"]
    assert set(pki) == {"sgx-root.pem", "sgx-pck-ca.pem", "sgx-pck-leaf.pem", "sgx-pck-leaf-key.pem"}
    root = x509.load_pem_x509_certificate(bytes.fromhex(pki["sgx-root.pem"]))
    leaf = x509.load_pem_x509_certificate(bytes.fromhex(pki["sgx-pck-leaf.pem"]))
    assert root.subject == root.issuer
    assert leaf.issuer != leaf.subject

    (namespace, configmap) = _applied(state)
    assert (namespace["kind"], namespace["name"]) == ("namespace", NAMESPACE)
    assert (configmap["namespace"], configmap["name"]) == (NAMESPACE, "keyvault-enclave-policy")
    policy = bytes.fromhex(configmap["data"]["enclave-policy.json"]).decode()
    assert measure_source_tree().hex() in policy
    assert DEV_MRSIGNER.hex() in policy


def test_bootstrap_twice_replaces_no_secret_but_rewrites_the_policy(tmp_path: Path) -> None:
    state, done = _run(tmp_path, existing="veil-postgresql veil-kek veil-sim-pki")
    assert _secrets(state) == {}  # nothing created, so nothing replaced
    assert done.stdout.count("exists; kept") == 3
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert not [call for call in calls if call[:1] == ["create"] and "secret" in call]
    assert [a["name"] for a in _applied(state)] == [NAMESPACE, "keyvault-enclave-policy"]
