"""Who the in-cluster CA may certify, Pod Security enforcement, and the sim KEK mount (rendered).

The CertificateRequestPolicies are evaluated here by `approves`, a small model of
approver-policy's documented rules (https://cert-manager.io/docs/policy/approval/approver-policy/):
a policy is *appropriate* for a request when the requester may `use` it in the request's
namespace (RBAC) and its issuerRef selector matches; the request is approved when one
appropriate policy permits it, denied when some are appropriate and none permits, and left
pending when none is appropriate. A policy permits a request that asks for no more than it
allows: each URI and DNS name among the allowed values (`*` globbing), required lists non-empty,
fields the policy omits left empty, isCA and the common name as allowed, usages a subset, the
duration within maxDuration, the key's algorithm and size as constrained.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from .kube import Obj, objects, overlays, render, workload, workloads

OVERLAYS = overlays()
CERT_MANAGER = ("cert-manager", "cert-manager")  # the chart's controller ServiceAccount
SERVICE_IDENTITIES = {
    "keyvault": "spiffe://veil/keyvault",
    "state": "spiffe://veil/state",
    "gateway": "spiffe://veil/gateway",
}
ADMIN = "spiffe://veil/admin"
MTLS_USAGES = ("digital signature", "server auth", "client auth")


@dataclass(frozen=True)
class Request:
    """What a CertificateRequest asks of an issuer."""

    issuer: str
    namespace: str
    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    usages: tuple[str, ...] = MTLS_USAGES
    is_ca: bool = False
    common_name: str = ""
    duration_h: float = 720
    key: tuple[str, int] = ("ECDSA", 256)
    requester: tuple[str, str] = field(default=CERT_MANAGER)


def _hours(duration: str) -> float:
    units = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600, "ms": 1 / 3_600_000}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ms|h|m|s)", duration))


def _namespace(overlay: str) -> str:
    (namespace,) = objects(overlay, "Namespace")
    return str(namespace["metadata"]["name"])


def _usable_policies(overlay: str, request: Request) -> set[str]:
    """Policies the requester may `use` in the request's namespace (RoleBindings and ClusterRoleBindings)."""
    roles = {r["metadata"]["name"]: r for r in objects(overlay, "ClusterRole")}
    names: set[str] = set()
    for binding in objects(overlay, "RoleBinding") + objects(overlay, "ClusterRoleBinding"):
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != request.namespace:
            continue
        subjects = {
            (s.get("namespace"), s["name"]) for s in binding["subjects"] if s["kind"] == "ServiceAccount"
        }
        if request.requester not in subjects or binding["roleRef"]["kind"] != "ClusterRole":
            continue
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            if (
                "policy.cert-manager.io" in rule["apiGroups"]
                and "certificaterequestpolicies" in rule["resources"]
                and "use" in rule["verbs"]
            ):
                names |= set(rule["resourceNames"])
    return names


def _values_permit(allowed: dict[str, Any] | None, requested: tuple[str, ...]) -> bool:
    if allowed is None:
        return not requested
    if allowed.get("required") and not requested:
        return False
    return all(any(fnmatch.fnmatchcase(r, v) for v in allowed["values"]) for r in requested)


def _permits(policy: Obj, request: Request) -> bool:
    allowed, constraints = policy["spec"].get("allowed", {}), policy["spec"].get("constraints", {})
    common = allowed.get("commonName")
    key = constraints.get("privateKey", {})
    return (
        request.is_ca == allowed.get("isCA", False)
        and (request.common_name == "" if common is None else request.common_name == common["value"])
        and _values_permit(allowed.get("uris"), request.uris)
        and _values_permit(allowed.get("dnsNames"), request.dns_names)
        and set(request.usages) <= set(allowed.get("usages", []))
        and request.duration_h <= _hours(constraints.get("maxDuration", "876000h"))
        and request.key[0] == key.get("algorithm", request.key[0])
        and request.key[1] >= key.get("minSize", 0)
    )


def approves(overlay: str, request: Request) -> bool | None:
    """True (approved), False (denied) or None (no appropriate policy: the request stays pending)."""
    usable = _usable_policies(overlay, request)
    appropriate = [
        p
        for p in objects(overlay, "CertificateRequestPolicy")
        if p["metadata"]["name"] in usable and p["spec"]["selector"]["issuerRef"]["name"] == request.issuer
    ]
    if not appropriate:
        return None
    return any(_permits(p, request) for p in appropriate)


def as_request(overlay: str, certificate: Obj) -> Request:
    spec = certificate["spec"]
    is_ca = spec.get("isCA", False)
    return Request(
        issuer=spec["issuerRef"]["name"],
        namespace=certificate["metadata"]["namespace"],
        uris=tuple(spec.get("uris", ())),
        dns_names=tuple(spec.get("dnsNames", ())),
        # cert-manager's defaults: a CA also signs certificates.
        usages=tuple(spec.get("usages", ("digital signature", "key encipherment")))
        + (("cert sign",) if is_ca else ()),
        is_ca=is_ca,
        common_name=spec.get("commonName", ""),
        duration_h=_hours(spec.get("duration", "2160h")),
        key=(spec["privateKey"]["algorithm"], spec["privateKey"]["size"]),
    )


def service_request(overlay: str, name: str) -> Request:
    (certificate,) = [
        c for c in objects(overlay, "Certificate") if c["spec"].get("uris") == [SERVICE_IDENTITIES[name]]
    ]
    return as_request(overlay, certificate)


# --- the in-cluster CA ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_certificate_of_the_overlay_is_approved(overlay: str) -> None:
    for certificate in objects(overlay, "Certificate"):
        assert approves(overlay, as_request(overlay, certificate)) is True, certificate["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ca_refuses_any_identity_but_the_three_services(overlay: str) -> None:
    namespace = _namespace(overlay)
    keyvault = service_request(overlay, "keyvault")
    attacks = {
        "admin as a server": replace(keyvault, uris=(ADMIN,), dns_names=("keyvault",)),
        "admin, two days": Request(
            "veil-ca", namespace, uris=(ADMIN,), usages=MTLS_USAGES[::2], duration_h=48
        ),
        "an unknown service": replace(keyvault, uris=("spiffe://veil/billing",)),
        "another trust domain": replace(keyvault, uris=("spiffe://evil/keyvault",)),
        "two identities at once": replace(
            keyvault, uris=(SERVICE_IDENTITIES["keyvault"], SERVICE_IDENTITIES["state"])
        ),
        "state's URI with the keyvault's name": replace(keyvault, uris=(SERVICE_IDENTITIES["state"],)),
        "the keyvault's URI with the gateway's name": replace(keyvault, dns_names=("gateway",)),
        "no URI (a DNS-only certificate)": replace(keyvault, uris=()),
        "a CA": replace(keyvault, is_ca=True, usages=(*MTLS_USAGES, "cert sign")),
        "a year": replace(keyvault, duration_h=8760),
        "an RSA key": replace(keyvault, key=("RSA", 4096)),
        "code signing": replace(keyvault, usages=(*MTLS_USAGES, "code signing")),
        "a common name": replace(keyvault, common_name="keyvault"),
    }
    for what, request in attacks.items():
        assert approves(overlay, request) is False, f"{overlay}: the in-cluster CA would issue {what}"


def test_admin_comes_only_from_the_sim_admin_ca_client_only_for_a_day() -> None:
    admin = Request(
        "veil-ca",
        _namespace("aks"),
        uris=(ADMIN,),
        usages=("digital signature", "client auth"),
        duration_h=24,
    )
    sim = _namespace("sim")
    # The services' CA never issues the admin (the services would refuse it anyway: issue 17).
    assert approves("aks", admin) is False
    assert approves("sim", replace(admin, namespace=sim)) is False
    # The sim's separate admin CA issues it, client-only, for a day; the aks overlay has none.
    from_admin_ca = replace(admin, issuer="veil-admin-ca", namespace=sim)
    assert approves("sim", from_admin_ca) is True
    assert approves("sim", replace(from_admin_ca, usages=MTLS_USAGES)) is False
    assert approves("sim", replace(from_admin_ca, uris=("spiffe://veil/keyvault",))) is False
    assert approves("aks", replace(from_admin_ca, namespace=_namespace("aks"))) is None  # no such issuer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shards_and_the_public_name_are_allowed(overlay: str) -> None:
    state = service_request(overlay, "state")
    assert approves(overlay, replace(state, dns_names=("state", "state-7.state"))) is True  # a new shard
    assert approves(overlay, replace(state, dns_names=("state-7.evil.example",))) is False
    gateway = service_request(overlay, "gateway")
    assert approves(overlay, gateway) is True  # on aks: with the LoadBalancer name
    assert approves(overlay, replace(gateway, dns_names=(*gateway.dns_names, "veil.example.com"))) is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_cert_manager_may_use_the_policies_and_only_here(overlay: str) -> None:
    namespace = _namespace(overlay)
    request = service_request(overlay, "keyvault")
    # Another requester (a user creating CertificateRequests by hand) has no policy: not approved.
    assert approves(overlay, replace(request, requester=(namespace, "default"))) is None
    # The same request in another namespace is not ours to judge.
    assert approves(overlay, replace(request, namespace="elsewhere")) is None
    for role in objects(overlay, "ClusterRole"):
        for rule in role["rules"]:
            assert rule["verbs"] == ["use"], role["metadata"]["name"]
            assert rule["resourceNames"], "a `use` rule without resourceNames would bind every policy"
    assert objects(overlay, "ClusterRoleBinding") == []


# --- Pod Security --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_enforces_restricted(overlay: str) -> None:
    (namespace,) = objects(overlay, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    for w in workloads(overlay):
        assert not [v for v in w.pod_spec.get("volumes") or [] if "hostPath" in v], w.name


def test_the_aesm_socket_is_an_administrators_volume_bound_to_this_namespace_only() -> None:
    (volume,) = objects("aks", "PersistentVolume")
    (claim,) = objects("aks", "PersistentVolumeClaim")
    spec = volume["spec"]
    assert spec["hostPath"] == {"path": "/var/run/aesmd", "type": "Directory"}
    assert spec["claimRef"] == {"namespace": _namespace("aks"), "name": claim["metadata"]["name"]}
    assert spec["accessModes"] == claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert spec["storageClassName"] == claim["spec"]["storageClassName"] == ""
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    users = {
        (w.name, v["persistentVolumeClaim"]["readOnly"])
        for w in workloads("aks")
        for v in w.pod_spec.get("volumes") or []
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
    }
    assert users == {("state", True)}


# --- the sim KEK ----------------------------------------------------------------------------------


def test_the_sim_kek_reaches_the_keyvault_as_a_private_copy() -> None:
    keyvault = workload("sim", "keyvault")
    main = keyvault.container("keyvault")
    kek_file = next(e["value"] for e in main["env"] if e["name"] == "VEIL_KEYVAULT_KEK_FILE")
    mount = next(m for m in main["volumeMounts"] if kek_file.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    assert keyvault.volume(mount["name"])["emptyDir"]["medium"] == "Memory"  # never on the node's disk
    secrets = {
        v["name"] for v in keyvault.pod_spec["volumes"] if v.get("secret", {}).get("secretName") == "veil-kek"
    }
    assert not [m for m in main["volumeMounts"] if m["name"] in secrets], "the service reads the copy only"
    (install,) = [c for c in keyvault.init_containers if c["args"][0] == "veil.services.keyvault.kek"]
    source, target = install["args"][1:]
    assert target == kek_file
    mounts = {m["name"]: m for m in install["volumeMounts"]}
    assert mounts[mount["name"]]["mountPath"] == mount["mountPath"]
    (secret_mount,) = [m for m in mounts.values() if m["name"] in secrets]
    assert secret_mount["readOnly"] is True
    assert source.startswith(secret_mount["mountPath"] + "/")


def test_rendering_is_deterministic() -> None:
    # The helpers above read the cached render; a second render must agree with it.
    render.cache_clear()
    first = render("aks")
    render.cache_clear()
    assert render("aks") == first
