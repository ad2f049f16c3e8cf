"""The rendered Kubernetes manifests: schema-valid, ordered, locked down, and wired as designed.

Every overlay under deploy/k8s/overlays is rendered with `kubectl kustomize`, validated with
kubernetes-validate (strict) and checked against tests/deploy/topology.yaml.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from veil.services.common import config as contract
from veil.services.common import wait
from veil.services.common.config import (
    ADMIN_LISTEN,
    DATA_DIR,
    DEFAULT_PORTS,
    GRACE_SECONDS,
    LISTEN,
    SERVER_SETTINGS,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    env_name,
)
from veil.services.common.identity import SERVICE_IDENTITIES
from veil.services.common.server import LIVENESS_SERVICE

from . import cert_manager
from .kube import (
    K8S,
    Obj,
    Workload,
    env,
    env_value,
    get,
    objects,
    overlays,
    render,
    topology,
    workload,
    workloads,
)
from .netpol import Cluster, Edge, Endpoint

OVERLAYS = overlays()
SERVICES: dict[str, dict[str, Any]] = topology()["services"]

# The oldest Kubernetes minor we support and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.34", kubernetes_validate.latest_version())

# Volume types the `restricted` Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# No pod has a hostPath: on AKS the AESM socket reaches the state pods through a claim on an
# administrator-made PersistentVolume (tests/deploy/test_identity_policy.py checks it).
ALLOWED_HOST_PATHS: dict[str, set[tuple[str, str]]] = {}

# Headroom over the enclave memory budget for code, stacks, TCS/SSA and Gramine (overlays/aks).
EPC_HEADROOM_MIB = 32


def test_both_overlays_exist() -> None:
    assert {"sim", "aks"} <= set(OVERLAYS)
    assert set(OVERLAYS) <= set(topology()["overlays"]), "add new overlays to topology.yaml"


def test_topology_matches_service_contract() -> None:
    # The table restates the services' own constants; catch drift on either side.
    assert {name: svc["identity"] for name, svc in SERVICES.items()} == dict(SERVICE_IDENTITIES)
    assert {name: (svc["port"], svc["admin_port"]) for name, svc in SERVICES.items()} == dict(DEFAULT_PORTS)


# --- schema validation -------------------------------------------------------------------------


def test_kubernetes_validate_ships_a_current_version() -> None:
    newest = tuple(int(part) for part in kubernetes_validate.latest_version().split(".")[:2])
    assert newest >= (1, 34)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_schema_valid(overlay: str, version: str) -> None:
    errors = []
    for obj in render(overlay):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            if obj["apiVersion"].startswith(("cert-manager.io/", "policy.cert-manager.io/")):
                # Not a Kubernetes API: checked against our own minimal schemas instead.
                cert_manager.validate(obj)
            else:
                kubernetes_validate.validate(obj, version, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError, LookupError) as exc:
            path = ".".join(str(p) for p in getattr(exc, "path", []))
            errors.append(f"{what}: {path}: {getattr(exc, 'message', exc)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_unknown_fields() -> None:
    # Guards the guard: strict mode must catch a misspelt field, not just wrong types.
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dataa": {}}
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    cert = get("sim", "Certificate", "keyvault")
    with pytest.raises(jsonschema.ValidationError):
        cert_manager.validate({**cert, "spec": {**cert["spec"], "dnsName": ["x"]}})


# --- deploy order ------------------------------------------------------------------------------


def _resolve(overlay: str, host: str, port: int) -> tuple[str, int]:
    """A Service DNS name (`svc` or `pod.svc`) and port -> (workload, container port)."""
    service_name = host.rsplit(".", maxsplit=1)[-1] if "." in host else host
    service = get(overlay, "Service", service_name)
    ports = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert ports, f"Service {service_name} has no port {port}"
    selector = service["spec"]["selector"]
    targets = [w for w in workloads(overlay) if selector.items() <= w.pod_labels.items()]
    assert len(targets) == 1, f"Service {service_name} selects {len(targets)} workloads"
    target = targets[0]
    if "." in host:
        # pod.svc: the StatefulSet's pod name and its governing headless Service.
        assert target.kind == "StatefulSet"
        assert target.obj["spec"]["serviceName"] == service_name
        assert service["spec"]["clusterIP"] == "None"
        assert re.fullmatch(rf"{target.name}-\d+", host.split(".", maxsplit=1)[0])
    target_port = ports[0].get("targetPort", port)
    if isinstance(target_port, str):
        target_port = target.named_ports()[target_port]
    return target.pod_labels["app.kubernetes.io/name"], int(target_port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_init_containers_wait_for_upstream_admin_ports(overlay: str) -> None:
    parser = wait.build_parser()
    for name, upstreams in topology()["waits_for"].items():
        waited = set()
        for init in workload(overlay, name).init_containers:
            assert "command" not in init, "init containers run the image's ENTRYPOINT (python -m)"
            module, *rest = init["args"]
            if (overlay, name, module) == ("sim", "keyvault", "veil.services.keyvault.kek"):
                continue  # the sim KEK's copy out of its Secret (test_identity_policy.py)
            assert module == "veil.services.common.wait", f"{name}/{init['name']}: not the wait module"
            args = parser.parse_args(rest)  # the real module accepts exactly these flags
            host, port = args.address.rsplit(":", 1)
            target, container_port = _resolve(overlay, host, int(port))
            assert container_port == SERVICES[target]["admin_port"], f"{name} waits on a non-admin port"
            assert args.service == target, "the log line must name what is awaited"
            assert args.timeout >= 60
            waited.add(target)
        assert waited == set(upstreams), f"{name} waits for {sorted(waited)}, expected {sorted(upstreams)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_main_containers_serve_the_contract_ports(overlay: str) -> None:
    for name, svc in SERVICES.items():
        w = workload(overlay, name)
        assert len(w.containers) == 1
        c = w.container(name)
        assert "command" not in c, "services run the image's ENTRYPOINT (python -m)"
        assert c["args"] == [f"veil.services.{name}"], f"{name}: not started as its own module"
        assert importlib.util.find_spec(f"veil.services.{name}.__main__") is not None
        expected_ports = {"grpc": svc["port"], "admin": svc["admin_port"]}
        if "public_port" in svc:
            expected_ports["public"] = svc["public_port"]
            assert env_value(c, "VEIL_GATEWAY_PUBLIC_LISTEN") == f"0.0.0.0:{svc['public_port']}"
        assert w.named_ports() == expected_ports
        assert env_value(c, env_name(name, LISTEN)) == f"0.0.0.0:{svc['port']}"
        assert env_value(c, env_name(name, ADMIN_LISTEN)) == f"0.0.0.0:{svc['admin_port']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_main_containers_have_grpc_probes_on_the_admin_port(overlay: str) -> None:
    for name, svc in SERVICES.items():
        c = workload(overlay, name).container(name)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            assert probe, f"{name}: no {kind}"
            assert "grpc" in probe, f"{name}: {kind} is not a gRPC probe"
            assert probe["grpc"]["port"] == svc["admin_port"], f"{name}: {kind} not on the admin port"
            # Readiness (and start-up) follow overall health; liveness asks for the health name
            # that stays SERVING while the process runs (veil.services.common.server.LIVENESS_SERVICE).
            expected = LIVENESS_SERVICE if kind == "livenessProbe" else ""
            assert probe["grpc"].get("service", "") == expected, f"{name}: {kind} asks for the wrong name"
        startup = c["startupProbe"]
        budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
            "failureThreshold", 3
        )
        assert budget >= 60, f"{name}: startup budget {budget}s is too short for SGX attestation"


# --- locked-down pods --------------------------------------------------------------------------


def _lockdown_problems(w: Workload) -> list[str]:
    problems = []
    pod = w.pod_spec
    pod_sc = pod.get("securityContext") or {}
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{w.name}: service account token mounted")
    problems += [f"{w.name}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for c in w.all_containers():
        where = f"{w.name}/{c['name']}"
        sc = c.get("securityContext") or {}

        def effective(key: str, sc: Obj = sc) -> Any:
            return sc.get(key, pod_sc.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if effective("runAsUser") in (None, 0):
            problems.append(f"{where}: no explicit non-root runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        if sc.get("capabilities") != {"drop": ["ALL"]}:
            problems.append(f"{where}: capabilities are not exactly drop ALL")
        if effective("seccompProfile") != {"type": "RuntimeDefault"}:
            problems.append(f"{where}: seccomp profile is not RuntimeDefault")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if any("hostPort" in p for p in c.get("ports") or []):
            problems.append(f"{where}: hostPort")
        resources = c.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (resources.get(section) or {}):
                    problems.append(f"{where}: no {resource} {section}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(overlay: str) -> None:
    problems = [p for w in workloads(overlay) for p in _lockdown_problems(w)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_are_restricted_types_except_the_aesm_socket(overlay: str) -> None:
    host_paths = set()
    for w in workloads(overlay):
        for volume in w.pod_spec.get("volumes") or []:
            kinds = set(volume) - {"name"}
            if kinds == {"hostPath"}:
                host_paths.add((w.name, volume["hostPath"]["path"]))
            else:
                assert kinds <= RESTRICTED_VOLUME_TYPES, f"{w.name}: volume {volume['name']} is {kinds}"
    assert host_paths == ALLOWED_HOST_PATHS.get(overlay, set())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_emptydir_mounts(overlay: str) -> None:
    # The root filesystem is read-only: every directory a service writes must be a volume.
    for name in SERVICES:
        c = workload(overlay, name).container(name)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        variables = env(c)
        writable = [env_value(c, env_name(name, DATA_DIR)), "/tmp"]
        if "VEIL_STATE_SEAL_DIR" in variables:
            writable.append(env_value(c, "VEIL_STATE_SEAL_DIR"))
        if "VEIL_STATE_PLATFORM_SECRET" in variables:
            writable.append(str(PurePosixPath(env_value(c, "VEIL_STATE_PLATFORM_SECRET")).parent))
        for path in writable:
            assert path in mounts, f"{name}: {path} is not a volume mount"
            assert not mounts[path].get("readOnly"), f"{name}: {path} is mounted read-only"
            assert "emptyDir" in workload(overlay, name).volume(mounts[path]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_veil_environment_names_are_the_contract(overlay: str) -> None:
    """Each service is configured only through names the contract defines, all its own."""
    for name in SERVICES:
        own = vars(contract) | vars(importlib.import_module(f"veil.services.{name}.config"))
        known = {value for key, value in own.items() if key.startswith("ENV_")}
        known |= {env_name(name, setting) for setting in SERVER_SETTINGS}
        for c in workload(overlay, name).containers:
            variables = {n for n in env(c) if n.startswith("VEIL_")}
            assert not variables - known, f"{name}: variables no service reads: {sorted(variables - known)}"
            foreign = {n for n in variables if not n.startswith(f"VEIL_{name.upper()}_")}
            assert not foreign, f"{name}: configured through names of another service: {sorted(foreign)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_drain(overlay: str) -> None:
    for name in SERVICES:
        w = workload(overlay, name)
        c = w.container(name)
        pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        drain = float(env_value(c, env_name(name, GRACE_SECONDS)))
        assert w.pod_spec["terminationGracePeriodSeconds"] > pre_stop + drain, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_shared(overlay: str) -> None:
    veil_images = set()
    for w in workloads(overlay):
        for c in w.all_containers():
            image = c["image"]
            tag = image.rsplit("/", 1)[-1]
            assert "@sha256:" in image or (":" in tag and not tag.endswith(":latest")), image
            if w.name in SERVICES:
                veil_images.add(image)
    assert len(veil_images) == 1, f"one image for all services, found {veil_images}"


# --- availability ------------------------------------------------------------------------------


def _pdb_for(overlay: str, w: Workload) -> Obj:
    matching = [
        p
        for p in objects(overlay, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= w.pod_labels.items()
    ]
    assert len(matching) == 1, f"{w.name}: {len(matching)} PodDisruptionBudgets"
    return matching[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keyvault_is_replicated_and_spread(overlay: str) -> None:
    w = workload(overlay, "keyvault")
    assert w.kind == "Deployment"
    assert w.obj["spec"]["replicas"] >= 2
    spread = {t["topologyKey"]: t for t in w.pod_spec["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert "topology.kubernetes.io/zone" in spread
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= w.pod_labels.items()
    assert _pdb_for(overlay, w)["spec"]["minAvailable"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_autoscales_behind_a_load_balancer(overlay: str) -> None:
    w = workload(overlay, "gateway")
    assert w.kind == "Deployment"
    assert "replicas" not in w.obj["spec"], "the HPA owns the replica count"
    (hpa,) = objects(overlay, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    _pdb_for(overlay, w)
    service = get(overlay, "Service", "gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    gateway = SERVICES["gateway"]
    public = sorted(p["port"] for p in service["spec"]["ports"])
    assert public == sorted([gateway["port"], gateway["public_port"]]), "admin port must stay private"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_state_is_a_statefulset_with_stable_names(overlay: str) -> None:
    w = workload(overlay, "state")
    assert w.kind == "StatefulSet"
    headless = get(overlay, "Service", w.obj["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= w.pod_labels.items()
    _pdb_for(overlay, w)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shard_map_matches_replicas_and_certificate(overlay: str) -> None:
    state = workload(overlay, "state")
    gateway = workload(overlay, "gateway").container("gateway")
    addresses = env_value(gateway, "VEIL_GATEWAY_STATE_ADDRS").split(",")
    assert len(addresses) == state.obj["spec"]["replicas"], "one address per shard"
    service = state.obj["spec"]["serviceName"]
    expected = [f"{state.name}-{i}.{service}:{SERVICES['state']['port']}" for i in range(len(addresses))]
    assert addresses == expected, "shard i must be pod i of the StatefulSet"
    state_names = set(_certificate_for(overlay, "state")["spec"]["dnsNames"])
    assert {a.rsplit(":", 1)[0] for a in addresses} <= state_names, "gRPC checks the dialled name"
    keyvault_names = set(_certificate_for(overlay, "keyvault")["spec"]["dnsNames"])
    for name in ("state", "gateway"):
        address = env_value(workload(overlay, name).container(name), env_name(name, "KEYVAULT_ADDR"))
        host, port = address.rsplit(":", 1)
        assert host in keyvault_names, f"{name} dials {host}, which the keyvault certificate lacks"
        assert _resolve(overlay, host, int(port)) == ("keyvault", SERVICES["keyvault"]["port"])


# --- SGX ---------------------------------------------------------------------------------------


def _mebibytes(quantity: str) -> int:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(quantity))
    assert match, f"unexpected quantity {quantity!r}"
    number, unit = int(match.group(1)), match.group(2)
    return int(number * units[unit]) if unit else number // (1024 * 1024)


def _sgx_resources(c: Obj) -> dict[str, Any]:
    resources = c.get("resources") or {}
    return {
        f"{section}.{key}": value
        for section in ("requests", "limits")
        for key, value in (resources.get(section) or {}).items()
        if key.startswith("sgx.intel.com/")
    }


def test_state_requests_sgx_on_aks() -> None:
    w = workload("aks", "state")
    c = w.container("state")
    sgx = _sgx_resources(c)
    epc = sgx["limits.sgx.intel.com/epc"]
    assert sgx["requests.sgx.intel.com/epc"] == epc, "extended resources cannot be overcommitted"
    budget = int(env_value(c, "VEIL_STATE_ENCLAVE_MEMORY_MB"))
    epc_mib = _mebibytes(epc)
    assert epc_mib >= budget + EPC_HEADROOM_MIB, f"EPC {epc} does not cover the {budget} MiB budget"
    assert epc_mib & (epc_mib - 1) == 0, "enclave sizes are powers of two"
    for device in ("enclave", "provision"):
        assert sgx[f"limits.sgx.intel.com/{device}"] == sgx[f"requests.sgx.intel.com/{device}"] == 1
    assert env_value(c, "VEIL_STATE_ENCLAVE_MODE") == "gramine"
    assert env_value(c, "SGX_AESM_ADDR") == "1"
    tolerations = w.pod_spec["tolerations"]
    assert {"key": "sgx.intel.com/epc", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert w.pod_spec["nodeSelector"], "state must be pinned to the SGX pool"
    (aesm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/var/run/aesmd"]
    claim = w.volume(aesm["name"])["persistentVolumeClaim"]["claimName"]
    (volume,) = [v for v in objects("aks", "PersistentVolume") if v["spec"]["claimRef"]["name"] == claim]
    assert volume["spec"]["hostPath"]["path"] == "/var/run/aesmd"


def test_state_shards_never_share_a_node_on_aks() -> None:
    w = workload("aks", "state")
    terms = w.pod_spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and t["labelSelector"]["matchLabels"].items() <= w.pod_labels.items()
        for t in terms
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_state_on_aks_touches_sgx(overlay: str) -> None:
    for w in workloads(overlay):
        for c in w.all_containers():
            if (overlay, w.name, c["name"]) != ("aks", "state", "state"):
                assert not _sgx_resources(c), f"{overlay}: {w.name}/{c['name']} requests SGX"
        tolerated = {t.get("key") for t in w.pod_spec.get("tolerations") or []}
        assert ("sgx.intel.com/epc" in tolerated) == ((overlay, w.name) == ("aks", "state"))


def test_sim_runs_the_simulated_enclave() -> None:
    c = workload("sim", "state").container("state")
    assert env_value(c, "VEIL_STATE_ENCLAVE_MODE") == "sim"
    assert "VEIL_STATE_PLATFORM_SECRET" in env(c)
    assert "SGX_AESM_ADDR" not in env(c)


# --- secrets and trust -------------------------------------------------------------------------


# Settings holding a password or PIN: read by our services from a mounted file (NAME_FILE).
SECRET_SETTINGS = ("VEIL_KEYVAULT_DB", "VEIL_STATE_DB", "VEIL_KEYVAULT_PKCS11_PIN")


def _secret_file_source(w: Workload, c: Obj, path: str) -> Obj:
    """The Secret volume (and its mode) that mounts the file at `path` in container `c`."""
    file = PurePosixPath(path)
    (mount,) = [m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == file.parent]
    assert mount.get("readOnly"), f"{w.name}: {file.parent} is writable"
    secret: Obj = w.volume(mount["name"])["secret"]
    assert [item["path"] for item in secret.get("items", [])] == [file.name]
    return secret


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets(overlay: str) -> None:
    for w in workloads(overlay):
        for c in w.all_containers():
            for name, entry in env(c).items():
                value = str(entry.get("value", ""))
                assert not re.search(r"://[^/\s]*@", value), f"{w.name}: credentials inline in {name}"
                # Our own secrets are files now; the plain variable stays for development only.
                assert name not in SECRET_SETTINGS, f"{w.name}: {name} in the environment; use {name}_FILE"
                if name.removesuffix("_FILE") in SECRET_SETTINGS:
                    secret = _secret_file_source(w, c, value)
                    assert secret["defaultMode"] & 0o027 == 0, f"{w.name}: {name} readable by others"
                elif "PIN" in name or "PASSWORD" in name:  # other images' (PostgreSQL's) settings
                    assert "secretKeyRef" in entry.get("valueFrom", {}), f"{w.name}: {name} not from a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_database_urls_are_mounted_from_the_shared_secret(overlay: str) -> None:
    for service in ("keyvault", "state"):
        w = workload(overlay, service)
        c = w.container(service)
        secret = _secret_file_source(w, c, env_value(c, f"VEIL_{service.upper()}_DB_FILE"))
        assert secret["secretName"] == "veil-postgresql"
        assert [item["key"] for item in secret["items"]] == [f"{service}-url"]


def test_aks_keyvault_trusts_intel_and_keeps_the_kek_in_an_hsm() -> None:
    w = workload("aks", "keyvault")
    c = w.container("keyvault")
    assert env_value(c, "VEIL_KEYVAULT_ATTESTATION_ROOT") == "intel"
    assert env_value(c, "VEIL_KEYVAULT_KEK_PROVIDER") == "pkcs11"
    for name in ("MODULE", "TOKEN_LABEL", "KEY_LABEL"):
        assert "secretKeyRef" in env(c)[f"VEIL_KEYVAULT_PKCS11_{name}"]["valueFrom"]
    pin = _secret_file_source(w, c, env_value(c, "VEIL_KEYVAULT_PKCS11_PIN_FILE"))
    assert (pin["secretName"], [item["key"] for item in pin["items"]]) == ("veil-kek-pkcs11", ["pin"])
    assert "VEIL_KEYVAULT_KEK_FILE" not in env(c)


def _certificate_for(overlay: str, service: str) -> Obj:
    """The Certificate whose Secret the service mounts for VEIL_<SERVICE>_TLS_*."""
    w = workload(overlay, service)
    c = w.container(service)
    paths = [PurePosixPath(env_value(c, env_name(service, n))) for n in (TLS_CERT, TLS_KEY, TLS_CA)]
    assert [p.name for p in paths] == ["tls.crt", "tls.key", "ca.crt"], "cert-manager's Secret layout"
    assert len({p.parent for p in paths}) == 1
    (mount,) = [m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == paths[0].parent]
    assert mount.get("readOnly")
    assert "subPath" not in mount, "subPath mounts never see a rotation"
    secret = w.volume(mount["name"])["secret"]["secretName"]
    (cert,) = [o for o in objects(overlay, "Certificate") if o["spec"]["secretName"] == secret]
    return cert


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_certificates_carry_the_authorized_identities(overlay: str) -> None:
    for name, svc in SERVICES.items():
        spec = _certificate_for(overlay, name)["spec"]
        assert spec["uris"] == [svc["identity"]], f"{name}: URI SANs {spec.get('uris')}"
        assert {"server auth", "client auth"} <= set(spec["usages"]), f"{name}: mTLS needs both usages"
        assert name in spec["dnsNames"]
    issued = [u for cert in objects(overlay, "Certificate") for u in cert["spec"].get("uris", [])]
    known = {svc["identity"] for svc in SERVICES.values()} | {topology()["admin_identity"]}
    assert set(issued) <= known, f"unknown identities {set(issued) - known}"
    assert len(issued) == len(set(issued)), "one Certificate per identity"
    issuers = {o["metadata"]["name"]: o for o in objects(overlay, "Issuer")}
    for cert in objects(overlay, "Certificate"):
        assert cert["spec"]["issuerRef"]["name"] in issuers, cert["metadata"]["name"]
    assert issuers["veil-ca"]["spec"] == {"ca": {"secretName": "veil-ca"}}


def test_admin_key_is_issued_in_the_cluster_only_for_sim() -> None:
    def admin_certs(overlay: str) -> list[Obj]:
        return [
            c
            for c in objects(overlay, "Certificate")
            if c["spec"].get("uris") == [topology()["admin_identity"]]
        ]

    (sim_admin,) = admin_certs("sim")
    assert sim_admin["spec"]["usages"] == ["digital signature", "client auth"], "a client, never a server"
    assert admin_certs("aks") == []


def test_gateway_public_name_matches_the_load_balancer_dns_label() -> None:
    label = get("aks", "Service", "gateway")["metadata"]["annotations"][
        "service.beta.kubernetes.io/azure-dns-label-name"
    ]
    names = _certificate_for("aks", "gateway")["spec"]["dnsNames"]
    assert any(re.fullmatch(rf"{re.escape(label)}\.[a-z0-9]+\.cloudapp\.azure\.com", n) for n in names)


# --- Secrets the operator creates ----------------------------------------------------------------


def _created_secrets(text: str) -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret` commands in a script or README."""
    joined = re.sub(r"\\\n\s*", " ", text)
    created: dict[str, set[str]] = {}
    for match in re.finditer(r"create secret (generic|tls) ([\w.-]+)([^\n]*)", joined):
        kind, name, rest = match.groups()
        keys = {"tls.crt", "tls.key"} if kind == "tls" else set()
        keys |= set(re.findall(r"--from-literal=([\w.-]+)=", rest))
        for key, path in re.findall(r"--from-file=(?:([\w.-]+)=)?\"?([^\s\"]+)", rest):
            keys.add(key or PurePosixPath(path).name)
        created[name] = keys
    return created


def _needed_secrets(overlay: str) -> dict[str, set[str]]:
    """Secrets the overlay reads that cert-manager does not produce, with the keys read."""
    needed: dict[str, set[str]] = {}
    for w in workloads(overlay):
        for c in w.all_containers():
            for entry in env(c).values():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    needed.setdefault(ref["name"], set()).add(ref["key"])
        for volume in w.pod_spec.get("volumes") or []:
            if "secret" in volume:
                keys = {item["key"] for item in volume["secret"].get("items") or []}
                needed.setdefault(volume["secret"]["secretName"], set()).update(keys)
    for issuer in objects(overlay, "Issuer"):
        if "ca" in issuer["spec"]:
            needed.setdefault(issuer["spec"]["ca"]["secretName"], set()).update({"tls.crt", "tls.key"})
    for cert in objects(overlay, "Certificate"):
        needed.pop(cert["spec"]["secretName"], None)
    return needed


@pytest.mark.parametrize(
    ("overlay", "source"),
    [("sim", "overlays/sim/bootstrap-secrets.sh"), ("aks", "README.md")],
)
def test_every_secret_read_is_created_by_the_documented_steps(overlay: str, source: str) -> None:
    created = _created_secrets((K8S / source).read_text())
    for name, keys in _needed_secrets(overlay).items():
        assert name in created, f"{overlay}: Secret {name} is read but {source} never creates it"
        assert keys <= created[name], f"{overlay}: {source} creates {name} without {keys - created[name]}"


# --- the network graph -------------------------------------------------------------------------


def _call_ports(call: dict[str, Any]) -> list[int]:
    target = SERVICES[call["to"]]
    ports = [target["port"]]
    if call["from"] == "client" and "public_port" in target:
        ports.append(target["public_port"])
    return ports


def _expected_edges(clients: set[str]) -> set[Edge]:
    """The edges topology.yaml asks for; `clients` are the endpoints that count as "client"."""
    topo = topology()
    edges = {
        (source, call["to"], port, "TCP")
        for call in topo["calls"]
        if call.get("network", True)
        for source in (clients if call["from"] == "client" else {call["from"]})
        # Clients may also use the gateway's TLS-only public port.
        for port in _call_ports(call)
    }
    for dependent, upstreams in topo["waits_for"].items():
        edges |= {(dependent, up, SERVICES[up]["admin_port"], "TCP") for up in upstreams}
    edges |= {(user, "postgresql", topo["database_port"], "TCP") for user in topo["database_users"]}
    edges |= {(user, "kube-dns", 53, proto) for user in topo["dns_users"] for proto in ("UDP", "TCP")}
    return edges


def _endpoints(overlay: str) -> list[Endpoint]:
    namespace = topology()["overlays"][overlay]["namespace"]
    found = [
        Endpoint(
            name=w.pod_labels["app.kubernetes.io/name"],
            namespace=w.namespace,
            labels=w.pod_labels,
            named_ports=w.named_ports(),
        )
        for w in workloads(overlay)
    ]
    assert {e.namespace for e in found} == {namespace}
    # Clients: the internet, a pod elsewhere, and pods elsewhere wearing each workload's
    # labels (a selector that forgets its namespace would admit them).
    found += [
        Endpoint("client", ip="203.0.113.10"),
        Endpoint("client", namespace="elsewhere", labels={"app": "client"}),
    ]
    found += [Endpoint("client", namespace="elsewhere", labels=w.pod_labels) for w in workloads(overlay)]
    found += [
        Endpoint("kube-dns", namespace="kube-system", labels={"k8s-app": "kube-dns"}),
        # Must be reachable by nothing: another kube-system pod (DNS egress is to kube-dns
        # only), a foreign pod in Veil's namespace, and the cloud metadata service (node
        # credentials on Azure).
        Endpoint("metrics-server", namespace="kube-system", labels={"k8s-app": "metrics-server"}),
        Endpoint("intruder", namespace=namespace, labels={"app": "intruder"}),
        Endpoint("instance-metadata", ip="169.254.169.254"),
    ]
    postgresql = topology()["overlays"][overlay]["postgresql"]
    if postgresql != "pod":
        found.append(Endpoint("postgresql", ip=postgresql))
    return found


def _probe_ports(overlay: str) -> set[int]:
    """Every port anything listens on or a policy names, plus canaries for port-less rules."""
    ports = {53, 80, 443, 8080, 5432}
    for w in workloads(overlay):
        ports |= {p["containerPort"] for c in w.containers for p in c.get("ports") or []}
    for policy in objects(overlay, "NetworkPolicy"):
        for direction in ("ingress", "egress"):
            for rule in policy["spec"].get(direction) or []:
                ports |= {p["port"] for p in rule.get("ports") or [] if isinstance(p.get("port"), int)}
    return ports


def _allowed_edges(overlay: str, policies: list[Obj]) -> set[Edge]:
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"].get("labels", {}) for ns in objects(overlay, "Namespace")
    }
    cluster = Cluster(policies, namespaces)
    return cluster.edges(
        _endpoints(overlay), _probe_ports(overlay), topology()["overlays"][overlay]["namespace"]
    )


def _assert_same_edges(allowed: set[Edge], expected: set[Edge]) -> None:
    assert allowed == expected, (
        f"allowed but not in topology.yaml: {sorted(allowed - expected)}\n"
        f"in topology.yaml but blocked: {sorted(expected - allowed)}"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_topology(overlay: str) -> None:
    namespace = topology()["overlays"][overlay]["namespace"]
    endpoints = _endpoints(overlay)
    # "client" is anyone whose egress Veil's policies do not govern: every endpoint outside
    # the namespace (the internet, other namespaces, even kube-dns or an external database).
    clients = {e.name for e in endpoints if e.namespace != namespace}
    _assert_same_edges(_allowed_edges(overlay, objects(overlay, "NetworkPolicy")), _expected_edges(clients))


def _one_direction(policies: list[Obj], direction: str) -> list[Obj]:
    """The policies with only their `direction` half (Ingress or Egress) left."""
    kept = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))
        if direction in types:
            section = direction.lower()
            half = {
                "podSelector": spec["podSelector"],
                "policyTypes": [direction],
                section: spec.get(section) or [],
            }
            kept.append({**policy, "spec": half})
    return kept


@pytest.mark.parametrize("direction", ["Ingress", "Egress"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_side_alone_enforces_the_topology(overlay: str, direction: str) -> None:
    # Defence in depth: the ingress rules alone already admit nothing beyond the topology into
    # Veil's pods, and the egress rules alone let nothing else out of them.
    namespace = topology()["overlays"][overlay]["namespace"]
    endpoints = _endpoints(overlay)
    inside = {e.name for e in endpoints if e.namespace == namespace}
    allowed = _allowed_edges(overlay, _one_direction(objects(overlay, "NetworkPolicy"), direction))
    if direction == "Ingress":
        # The public port admits anyone by design, Veil's own pods included: only their
        # egress rules keep them from calling it.
        expected = {e for e in _expected_edges({e.name for e in endpoints}) if e[0] != e[1]}
        side = 1
    else:
        expected = _expected_edges({e.name for e in endpoints if e.namespace != namespace})
        side = 0
    _assert_same_edges(
        {e for e in allowed if e[side] in inside},
        {e for e in expected if e[side] in inside},
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_covers_every_pod(overlay: str) -> None:
    deny = get(overlay, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
