"""Evaluate Kubernetes NetworkPolicies as a graph: which (source, destination, port) may connect.

Semantics follow the networking.k8s.io/v1 API: a pod selected by any policy of a direction
is isolated in that direction and admits only what some rule of those policies allows;
peers in one rule are ORed, a peer's podSelector and namespaceSelector are ANDed; a missing
or empty `to`/`from` matches every peer, missing or empty `ports` every port; named ports
resolve against the destination pod. Traffic between a pod and its own node (kubelet
probes) is always allowed by Kubernetes and is not modelled. ipBlock matches only endpoints
outside the cluster: what it does for pod IPs is implementation-defined.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Edge = tuple[str, str, int, str]
"""(source name, destination name, port, protocol)."""


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace set) or an address outside the cluster (ip set)."""

    name: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None
    named_ports: Mapping[str, int] = field(default_factory=dict)

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector against a label set; an empty selector matches everything."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, operator, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {operator!r}")
    return True


class Cluster:
    """Policies of one namespace plus the namespaces' labels, able to answer reachability."""

    def __init__(
        self,
        policies: Iterable[Mapping[str, Any]],
        namespace_labels: Mapping[str, Mapping[str, str]],
    ) -> None:
        self._policies = list(policies)
        self._namespace_labels = namespace_labels

    def _ns_labels(self, namespace: str) -> Mapping[str, str]:
        # The API server sets this label on every namespace.
        return {"kubernetes.io/metadata.name": namespace, **self._namespace_labels.get(namespace, {})}

    def _policies_for(self, pod: Endpoint, direction: str) -> list[Mapping[str, Any]]:
        chosen = []
        for policy in self._policies:
            spec = policy["spec"]
            types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))
            if (
                direction in types
                and policy["metadata"]["namespace"] == pod.namespace
                and selector_matches(spec.get("podSelector"), pod.labels)
            ):
                chosen.append(policy)
        return chosen

    def _peer_matches(self, peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            if other.ip is None:
                return False
            address = ipaddress.ip_address(other.ip)
            block = peer["ipBlock"]
            if address not in ipaddress.ip_network(block["cidr"]):
                return False
            return not any(address in ipaddress.ip_network(e) for e in block.get("except") or [])
        if not other.is_pod:
            return False
        assert other.namespace is not None
        if "namespaceSelector" in peer:
            if not selector_matches(peer["namespaceSelector"], self._ns_labels(other.namespace)):
                return False
        elif other.namespace != policy_ns:
            return False
        return selector_matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port_matches(rule_ports: Sequence[Mapping[str, Any]], dst: Endpoint, port: int, proto: str) -> bool:
        if not rule_ports:
            return True
        for entry in rule_ports:
            if entry.get("protocol", "TCP") != proto:
                continue
            wanted = entry.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):
                wanted = dst.named_ports.get(wanted)
                if wanted is None:
                    continue
            if wanted <= port <= entry.get("endPort", wanted):
                return True
        return False

    def _admits(
        self, pod: Endpoint, other: Endpoint, direction: str, dst: Endpoint, port: int, proto: str
    ) -> bool:
        policies = self._policies_for(pod, direction)
        if not policies:
            return True  # not isolated in this direction
        rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for policy in policies:
            for rule in policy["spec"].get(rules_key) or []:
                peers = rule.get(peers_key) or []
                if peers and not any(
                    self._peer_matches(p, policy["metadata"]["namespace"], other) for p in peers
                ):
                    continue
                if self._port_matches(rule.get("ports") or [], dst, port, proto):
                    return True
        return False

    def allows(self, src: Endpoint, dst: Endpoint, port: int, proto: str) -> bool:
        """Both ends must agree: the source's egress and the destination's ingress."""
        egress_ok = not src.is_pod or self._admits(src, dst, "Egress", dst, port, proto)
        ingress_ok = not dst.is_pod or self._admits(dst, src, "Ingress", dst, port, proto)
        return egress_ok and ingress_ok

    def edges(
        self, endpoints: Sequence[Endpoint], ports: Iterable[int], governed_namespace: str
    ) -> set[Edge]:
        """Every allowed (src, dst, port, proto) among `endpoints`, named by endpoint name.

        Only connections with an end in `governed_namespace` are reported: the rest are not
        these policies' business.
        """
        found: set[Edge] = set()
        port_list = sorted(set(ports))
        for src, dst in itertools.permutations(endpoints, 2):
            if governed_namespace not in (src.namespace, dst.namespace):
                continue
            for port, proto in itertools.product(port_list, ("TCP", "UDP")):
                if self.allows(src, dst, port, proto):
                    found.add((src.name, dst.name, port, proto))
        return found
