"""Render the kustomize overlays once and give the tests typed views of what came out."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
TOPOLOGY_FILE = Path(__file__).with_name("topology.yaml")

Obj = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")


def overlays() -> list[str]:
    """Every overlay directory, so a new one is validated without touching the tests."""
    return sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


@functools.cache
def topology() -> Mapping[str, Any]:
    data: Mapping[str, Any] = yaml.safe_load(TOPOLOGY_FILE.read_text())
    return data


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>`, parsed; cached for the session."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: the deploy tests render the overlays with `kubectl kustomize` "
            "(install kubectl >= 1.27; it bundles kustomize v5)"
        )
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize overlays/{overlay} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def objects(overlay: str, kind: str) -> list[Obj]:
    return [o for o in render(overlay) if o["kind"] == kind]


def get(overlay: str, kind: str, name: str) -> Obj:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Workload:
    """A pod-owning object and its pod template."""

    obj: Obj

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.obj["metadata"]["namespace"])

    @property
    def pod_spec(self) -> Obj:
        spec: Obj = self.obj["spec"]["template"]["spec"]
        return spec

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.obj["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def containers(self) -> list[Obj]:
        containers: list[Obj] = self.pod_spec["containers"]
        return containers

    @property
    def init_containers(self) -> list[Obj]:
        init: list[Obj] = self.pod_spec.get("initContainers") or []
        return init

    def all_containers(self) -> Iterator[Obj]:
        yield from self.init_containers
        yield from self.containers

    def container(self, name: str) -> Obj:
        found = [c for c in self.containers if c["name"] == name]
        assert len(found) == 1, f"{self.name}: no single container {name!r}"
        return found[0]

    def named_ports(self) -> dict[str, int]:
        ports: dict[str, int] = {
            p["name"]: p["containerPort"]
            for c in self.containers
            for p in c.get("ports") or []
            if "name" in p
        }
        return ports

    def volume(self, name: str) -> Obj:
        found: list[Obj] = [v for v in self.pod_spec.get("volumes") or [] if v["name"] == name]
        assert len(found) == 1, f"{self.name}: no single volume {name!r}"
        return found[0]


def workloads(overlay: str) -> list[Workload]:
    found = [Workload(o) for o in render(overlay) if o["kind"] in WORKLOAD_KINDS]
    # Bare pods and jobs would escape the checks below, which read pod templates.
    assert all(w.kind in ("Deployment", "StatefulSet") for w in found), [w.kind for w in found]
    return found


def workload(overlay: str, name: str) -> Workload:
    found = [w for w in workloads(overlay) if w.name == name]
    assert len(found) == 1, f"{overlay}: no single workload {name!r}"
    return found[0]


def env(container: Obj) -> dict[str, Obj]:
    """name -> env entry (with `value` or `valueFrom`)."""
    return {e["name"]: e for e in container.get("env") or []}


def env_value(container: Obj, name: str) -> str:
    entry = env(container).get(name)
    assert entry is not None, f"{container['name']}: no {name}"
    assert "value" in entry, f"{container['name']}: {name} has no literal value"
    return str(entry["value"])
