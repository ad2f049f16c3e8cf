"""The container image, built by scripts/image.sh, and a mesh run from it as the manifests run it.

Docker is installed and started on demand (root, apt); the tests skip, with the reason, only where
that cannot be done. Every container, volume and tag is named per run and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from veil.dev.pki import ADMIN_CA_FILE, collateral_dir
from veil.dev.policies import dev_enclave_policy_json, dev_policy
from veil.dev.supervisor import DEPLOY_ORDER, free_port_offset, keyvault_pins, port_env
from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sim_quote import DEV_MRSIGNER
from veil.sdk.trust_policy import POLICY_FILE, save_policy
from veil.services.common.config import (
    ADMIN_CA,
    DATA_DIR,
    DEFAULT_PORTS,
    ENV_KEYVAULT_ATTESTATION_ROOT,
    ENV_KEYVAULT_ENCLAVE_POLICY_FILE,
    ENV_KEYVAULT_KEK_FILE,
    ENV_KEYVAULT_KEK_PROVIDER,
    ENV_STATE_ENCLAVE_MODE,
    GRACE_SECONDS,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    server_env,
)
from veil.services.gateway.config import DEFAULT_PUBLIC_PORT
from veil.services.keyvault.config import ENV_KEYVAULT_COLLATERAL_DIR

IMAGE_SH = REPO_ROOT / "scripts" / "image.sh"
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
#: scripts/image.sh's exit status for "no Docker engine here" (the only reason to skip).
NO_ENGINE = 3
#: The image's non-root user (Dockerfile) and the manifests' runAsUser.
UID = 10001
VEIL = Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin" / "veil"
#: In-container paths, as the manifests mount them (deploy/k8s/base, overlays/sim).
DATA = "/var/lib/veil"
TLS = "/etc/veil/tls"


def docker(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(  # the Docker client with our own arguments
        [DOCKER, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert result.returncode == 0, f"docker {' '.join(argv)}: {result.stderr.strip()}"
    return result


@dataclass(frozen=True)
class Image:
    """A built image, the base it was built on, and the sim MRENCLAVE `veil up` computes for the
    sources it was built from."""

    tag: str
    base: str
    mrenclave: bytes


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    """The runtime image of this checkout, under a tag of its own (removed afterwards)."""
    engine = subprocess.run(  # our own script
        [str(IMAGE_SH), "engine"], capture_output=True, text=True, timeout=900, check=False
    )
    if engine.returncode == NO_ENGINE:
        pytest.skip(engine.stderr.strip().splitlines()[-1])
    assert engine.returncode == 0, engine.stderr
    tag = f"veil:test-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "VEIL_IMAGE": tag}
    # The checkout's measurement, the same before and after the build: the image holds those
    # sources (a shared working tree can change under a build; then build again).
    for _ in range(3):
        mrenclave = measure_source_tree()
        built = subprocess.run(  # our own script
            [str(IMAGE_SH), "build"], capture_output=True, text=True, timeout=900, check=False, env=env
        )
        assert built.returncode == 0, built.stderr[-4000:]
        assert built.stdout.strip() == tag
        if measure_source_tree() == mrenclave:
            break
    else:
        pytest.fail("the enclave sources changed during every build")
    base = subprocess.run(
        [str(IMAGE_SH), "base"], capture_output=True, text=True, timeout=900, check=True, env=env
    ).stdout.strip()
    try:
        yield Image(tag=tag, base=base, mrenclave=mrenclave)
    finally:
        docker("rmi", tag, check=False)


def run_python(image: str, program: str) -> str:
    """`program` run by the image's Python as the manifests run it: non-root, read-only root fs."""
    result = docker(
        "run", "--rm", "--network", "host", "--read-only", "--user", f"{UID}:{UID}", "--tmpfs", "/tmp",
        "--entrypoint", "python", image, "-c", program,
    )  # fmt: skip
    return result.stdout


@dataclass
class ContainerMesh:
    """keyvault, state and gateway containers from one image, and the host side's data dir."""

    image: str
    mrenclave: bytes
    data_dir: Path
    secrets: Path
    offset: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def name(self, service: str) -> str:
        return f"veil-test-{self.run_id}-{service}"

    def address(self, service: str, admin: int = 0) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS[service][admin] + self.offset}"

    @property
    def gateway(self) -> str:
        return self.address("gateway")

    @property
    def public_gateway(self) -> str:
        return f"127.0.0.1:{DEFAULT_PUBLIC_PORT + self.offset}"

    def _secret_dir(self, service: str, part: str, files: dict[str, Path]) -> Path:
        """Read-only files for one container, owned by its user as a Secret volume would be."""
        directory = self.secrets / service / part
        directory.mkdir(parents=True)
        for name, source in files.items():
            target = directory / name
            shutil.copyfile(source, target)
            os.chown(target, UID, UID)
            target.chmod(0o400)
        return directory

    def _mounts(self, service: str) -> tuple[list[str], dict[str, str]]:
        pki = self.data_dir / "pki"
        tls = self._secret_dir(
            service,
            "tls",
            {
                "tls.crt": pki / f"{service}.pem",
                "tls.key": pki / f"{service}-key.pem",
                "ca.crt": pki / "ca.pem",
            },
        )
        # As the manifests do: admin calls are accepted only from a leaf of the separate admin CA.
        admin_ca = self._secret_dir(service, "admin-ca", {"ca.crt": pki / ADMIN_CA_FILE})
        mounts = ["-v", f"{self.volume(service)}:{DATA}", "-v", f"{tls}:{TLS}:ro"]
        mounts += ["-v", f"{admin_ca}:/etc/veil/admin-ca:ro"]
        env = {
            **server_env(
                service,
                {
                    DATA_DIR: DATA,
                    TLS_CERT: f"{TLS}/tls.crt",
                    TLS_KEY: f"{TLS}/tls.key",
                    TLS_CA: f"{TLS}/ca.crt",
                    ADMIN_CA: "/etc/veil/admin-ca/ca.crt",
                    GRACE_SECONDS: "5",
                },
            ),
            **port_env(service, self.offset),
        }
        if service == "keyvault":
            # overlays/sim: the dev SGX root as a PEM path (so the operator enclave policy is
            # required, as in production), the KEK file and the policy from Secrets/ConfigMaps.
            root = self._secret_dir(service, "sim-pki", {"sgx-root.pem": pki / "sgx-root.pem"})
            kek = self.secrets / "kek"
            kek.write_bytes(os.urandom(32))
            kek_dir = self._secret_dir(service, "kek", {"kek": kek})
            policy = self.secrets / "enclave-policy.json"
            policy.write_text(dev_enclave_policy_json(self.mrenclave, DEV_MRSIGNER))
            policy_dir = self._secret_dir(service, "enclave-policy", {"enclave-policy.json": policy})
            collateral = self._secret_dir(
                service, "collateral", {p.name: p for p in collateral_dir(pki).iterdir()}
            )
            mounts += ["-v", f"{root}:/etc/veil/sim-pki:ro", "-v", f"{kek_dir}:/etc/veil/kek:ro"]
            mounts += ["-v", f"{policy_dir}:/etc/veil/enclave-policy:ro"]
            mounts += ["-v", f"{collateral}:/etc/veil/collateral:ro"]
            env |= {
                ENV_KEYVAULT_ATTESTATION_ROOT: "/etc/veil/sim-pki/sgx-root.pem",
                ENV_KEYVAULT_KEK_PROVIDER: "file",
                ENV_KEYVAULT_KEK_FILE: "/etc/veil/kek/kek",
                ENV_KEYVAULT_ENCLAVE_POLICY_FILE: "/etc/veil/enclave-policy/enclave-policy.json",
                ENV_KEYVAULT_COLLATERAL_DIR: "/etc/veil/collateral",
            }
        if service == "state":
            # overlays/sim: the sim enclave quotes with the dev PCK chain under $VEIL_DATA_DIR/pki.
            names = ("sgx-root.pem", "sgx-pck-ca.pem", "sgx-pck-leaf.pem", "sgx-pck-leaf-key.pem")
            sim_pki = self._secret_dir(service, "sim-pki", {n: pki / n for n in names})
            mounts += ["-v", f"{sim_pki}:{DATA}/pki:ro"]
            env[ENV_STATE_ENCLAVE_MODE] = "sim"
        return mounts, env

    def volume(self, service: str) -> str:
        return f"{self.name(service)}-data"

    def run(self, service: str) -> None:
        """Create and start one service's container, as its manifest runs it."""
        mounts, env = self._mounts(service)
        docker(
            "run", "--detach", "--name", self.name(service), "--network", "host",
            "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{UID}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            *mounts, *[arg for k, v in env.items() for arg in ("--env", f"{k}={v}")],
            self.image, f"veil.services.{service}",
        )  # fmt: skip

    def wait(self, service: str, timeout: int = 60) -> None:
        """The manifests' init container: the image's wait module against the admin port."""
        result = docker(
            "run", "--rm", "--network", "host", "--read-only", "--user", f"{UID}:{UID}",
            self.image, "veil.services.common.wait", "--address", self.address(service, 1),
            "--service", service, "--timeout", str(timeout),
            timeout=timeout + 30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, (
            f"{service} did not become SERVING: {result.stderr}\n{self.logs(service)}"
        )

    def logs(self, service: str) -> str:
        result = docker("logs", "--tail", "40", self.name(service), check=False)
        return f"--- {service} ---\n{result.stdout}{result.stderr}"

    def inspect(self, service: str) -> dict[str, object]:
        (found,) = json.loads(docker("inspect", self.name(service)).stdout)
        assert isinstance(found, dict)
        return found

    def remove(self) -> None:
        for service in reversed(DEPLOY_ORDER):
            docker("rm", "--force", "--volumes", self.name(service), check=False)
            docker("volume", "rm", "--force", self.volume(service), check=False)


@pytest.fixture(scope="session")
def container_mesh(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerMesh]:
    """keyvault → state → gateway from the image, each SERVING before the next starts (one per
    session: the tests share it, and the walk-through's restart leaves it serving)."""
    root = tmp_path_factory.mktemp("image-mesh")
    data_dir = root / ".veil"
    subprocess.run(  # the host's own CLI
        [str(VEIL), "pki", "init", "--data-dir", str(data_dir)], capture_output=True, check=True, timeout=60
    )
    mesh = ContainerMesh(image.tag, image.mrenclave, data_dir, root / "secrets", free_port_offset())
    try:
        for service in DEPLOY_ORDER:
            mesh.run(service)
            mesh.wait(service)
        # What `veil up` does once the mesh is up: pin the keyvault's release key and JWKS (and
        # the sim enclave of the sources the image holds).
        pins = keyvault_pins(data_dir, mesh.offset)
        policy = dev_policy([image.mrenclave], keyvault_release_key=pins.release_key, jwks=pins.jwks)
        save_policy(policy, data_dir / POLICY_FILE)
        yield mesh
    finally:
        mesh.remove()
