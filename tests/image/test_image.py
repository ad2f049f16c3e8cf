"""The image, built and run: no build secret in a layer, the checkout's sim measurement, and the
mesh from three locked-down containers serving the CLI's token walk-through across a kill -9 of
the state container."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.image.conftest import DATA, DOCKER, UID, VEIL, ContainerMesh, Image, docker, run_python
from veil.dev.policies import dev_enclave_policy_json
from veil.dev.supervisor import DEPLOY_ORDER
from veil.enclave.providers.sim_quote import DEV_MRSIGNER
from veil.services.keyvault.config import DEFAULT_ISSUER
from veil.services.keyvault.enclave_policy import load_enclave_policy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----")
BOOTSTRAP = REPO_ROOT / "deploy" / "k8s" / "overlays" / "sim" / "bootstrap-secrets.sh"
AKS_POLICY = REPO_ROOT / "deploy" / "k8s" / "overlays" / "aks" / "enclave-policy.json"
MEASURE = "from veil.enclave.measurement import measure_source_tree; print(measure_source_tree().hex())"


def pip_ca() -> Path:
    """The CA bundle scripts/image.sh hands the build as a secret."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return Path("/etc/ssl/certs/ca-certificates.crt")


def added_files(image: Image) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """Every entry of the layers the Dockerfile added on top of the base image (`docker save`),
    with the content of regular files."""

    def diff_ids(ref: str) -> list[str]:
        ids = json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref).stdout)
        assert isinstance(ids, list)
        return [str(i) for i in ids]

    base, ours = diff_ids(image.base), diff_ids(image.tag)
    assert ours[: len(base)] == base, "the image is not built on the base image"
    assert len(ours) > len(base), "the Dockerfile added no layer"
    saved = subprocess.run([DOCKER, "save", image.tag], capture_output=True, check=True, timeout=300).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as outer:
        (manifest,) = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for path in manifest["Layers"]:
            blob = outer.extractfile(path).read()  # type: ignore[union-attr]
            if "sha256:" + hashlib.sha256(blob).hexdigest() in base:
                continue
            with tarfile.open(fileobj=io.BytesIO(blob)) as layer:
                for member in layer:
                    content = layer.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
                    yield member, content


def test_no_layer_holds_the_build_secrets(image: Image) -> None:
    """The CA bundle and pip.conf reach pip as BuildKit secrets only: no added layer holds the
    bundle, any certificate the base does not ship, a pip.conf, or anything under /run/secrets."""
    ca = pip_ca().read_bytes()
    shipped = docker(
        "run", "--rm", "--network", "host", "--entrypoint", "cat", image.base,
        "/etc/ssl/certs/ca-certificates.crt",
    ).stdout.encode()  # fmt: skip
    machine_only = set(PEM.findall(ca)) - set(PEM.findall(shipped))
    for member, content in added_files(image):
        name = member.name.removeprefix("./")
        assert not name.startswith("run/secrets/") or member.isdir(), name
        assert Path(name).name != "pip.conf", name
        assert content != ca, f"{name} is the build's CA bundle"
        for cert in machine_only:
            assert cert not in content, f"{name} holds a certificate of the build machine's CA bundle"


def test_the_images_sim_mrenclave_is_the_checkouts(image: Image) -> None:
    """Measured inside the image (as an operator reads it, deploy/k8s/README.md) = `veil up`'s."""
    assert run_python(image.tag, MEASURE).strip() == image.mrenclave.hex()
    # The sim overlay's operator policy, computed by bootstrap-secrets.sh's own program inside the
    # image, is the one it computes from the checkout (tests/deploy runs it there).
    (program,) = re.findall(r"-c '([^']+)'", BOOTSTRAP.read_text())
    assert run_python(image.tag, program) == dev_enclave_policy_json(image.mrenclave, DEV_MRSIGNER)


def test_image_runs_as_non_root_with_owned_data_dirs(image: Image) -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image.tag).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["python", "-m"]
    owners = run_python(
        image.tag, f"import os; print(os.stat('{DATA}').st_uid, os.stat('/var/lib/veil-seal').st_uid)"
    )
    assert owners.split() == [str(UID), str(UID)]


def cli(mesh: ContainerMesh, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The host's `veil` against the containerized gateway."""
    result = subprocess.run(  # the host's own CLI
        [str(VEIL), *argv, "--data-dir", str(mesh.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "VEIL_GATEWAY": mesh.gateway},
    )
    if check:
        logs = "".join(mesh.logs(s) for s in DEPLOY_ORDER)
        assert result.returncode == 0, f"veil {' '.join(argv)}\n{result.stdout}\n{result.stderr}\n{logs}"
    return result


def cli_json(mesh: ContainerMesh, *argv: str) -> Any:
    return json.loads(cli(mesh, *argv, "--json").stdout)


def balances(mesh: ContainerMesh, instance: str, *names: str) -> dict[str, int]:
    return {n: cli_json(mesh, "token", "balance", instance, "--as", n)["balance"] for n in names}


def test_containers_run_locked_down(container_mesh: ContainerMesh) -> None:
    for service in DEPLOY_ORDER:
        found = container_mesh.inspect(service)
        host = found["HostConfig"]
        assert isinstance(host, dict)
        assert host["ReadonlyRootfs"] is True
        assert host["NetworkMode"] == "host"
        assert host["CapDrop"] == ["ALL"]
        assert found["Config"]["User"] == f"{UID}:{UID}"  # type: ignore[index]
        mounts = {m["Destination"]: m for m in found["Mounts"]}  # type: ignore[attr-defined]
        assert mounts[DATA]["Type"] == "volume"
        assert mounts["/etc/veil/tls"]["RW"] is False


def test_attestation_of_the_containerized_enclave(container_mesh: ContainerMesh) -> None:
    """The host CLI trusts the enclave in the container: the checkout's MRENCLAVE, and claims the
    aks overlay's operator policy accepts once its MRSIGNER is filled in (the sim signer here)."""
    shown = cli_json(container_mesh, "attest", "show")
    assert shown["verified"] is True
    assert shown["mrenclave"] == container_mesh.mrenclave.hex()
    template = AKS_POLICY.read_text()
    filled = re.sub(r'"EDIT: [^"]*"', f'"{DEV_MRSIGNER.hex()}"', template)
    policy_file = container_mesh.secrets / "aks-enclave-policy.json"
    policy_file.write_text(filled)
    policy = load_enclave_policy(policy_file, issuer=DEFAULT_ISSUER)
    claims = {
        "iss": DEFAULT_ISSUER,
        "x-ms-sgx-mrenclave": shown["mrenclave"],
        "x-ms-sgx-mrsigner": shown["mrsigner"],
        "x-ms-sgx-product-id": shown["product_id"],
        "x-ms-sgx-svn": shown["svn"],
        "x-ms-sgx-is-debuggable": shown["debug"],
        "x-ms-sgx-tcb-status": shown["tcb_status"],
    }
    assert policy.refusal(claims) is None, (shown, policy.refusal(claims))


def start_transfers(mesh: ContainerMesh, count: int) -> list[subprocess.Popen[str]]:
    """`count` concurrent one-token transfers alice -> bob by the host CLI."""
    argv = [str(VEIL), "token", "transfer", "image-coins", "bob", "1", "--as", "alice"]
    return [
        subprocess.Popen(
            [*argv, "--data-dir", str(mesh.data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "VEIL_GATEWAY": mesh.gateway},
        )
        for _ in range(count)
    ]


def test_token_walkthrough_survives_a_killed_state_container(container_mesh: ContainerMesh) -> None:
    mesh = container_mesh
    for name in ("treasury", "alice", "bob"):
        cli(mesh, "identity", "new", name)
    cli(mesh, "instance", "create", "image-coins", "--app", "token", "--as", "treasury")
    assert (
        cli_json(mesh, "token", "mint", "image-coins", "alice", "500", "--as", "treasury")["total_supply"]
        == 500
    )
    assert cli_json(mesh, "token", "transfer", "image-coins", "bob", "120", "--as", "alice")["balance"] == 380
    refused = cli(mesh, "token", "transfer", "image-coins", "alice", "1000", "--as", "bob", check=False)
    assert refused.returncode == 1
    assert balances(mesh, "image-coins", "alice", "bob") == {"alice": 380, "bob": 120}

    # Transfers in flight, then SIGKILL (no grace) once the first is acknowledged; then the same
    # container (same volume) again, as a kubelet restarts it.
    senders = start_transfers(mesh, 6)
    deadline = time.monotonic() + 60
    while all(s.poll() is None for s in senders) and time.monotonic() < deadline:
        time.sleep(0.02)
    docker("kill", "--signal", "KILL", mesh.name("state"))
    assert docker("wait", mesh.name("state")).stdout.strip() == "137"
    docker("start", mesh.name("state"))
    mesh.wait("state")
    acknowledged = 0
    for sender in senders:
        _, err = sender.communicate(timeout=90)
        assert "Traceback" not in err, err
        acknowledged += sender.returncode == 0
    assert acknowledged >= 1

    # Every acknowledged transfer is there; an unacknowledged one may or may not be; none twice.
    after = balances(mesh, "image-coins", "alice", "bob")
    assert 120 + acknowledged <= after["bob"] <= 120 + len(senders), (acknowledged, after)
    assert after["alice"] + after["bob"] == 500, after
    sent = cli_json(mesh, "token", "transfer", "image-coins", "alice", "20", "--as", "bob")
    assert sent["balance"] == after["bob"] - 20
    assert balances(mesh, "image-coins", "alice", "bob") == {
        "alice": after["alice"] + 20,
        "bob": after["bob"] - 20,
    }
    assert "image-coins" in cli(mesh, "instance", "list").stdout
