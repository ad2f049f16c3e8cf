"""The NetworkPolicy evaluator itself, on small cases whose answer the API documentation fixes."""

from __future__ import annotations

from typing import Any

import pytest

from .netpol import Cluster, Endpoint, selector_matches

NS = "app"
WEB = Endpoint("web", namespace=NS, labels={"role": "web"}, named_ports={"http": 8080})
DB = Endpoint("db", namespace=NS, labels={"role": "db"}, named_ports={"pg": 5432})
OTHER_DB = Endpoint("other-db", namespace="other", labels={"role": "db"})
INTERNET = Endpoint("internet", ip="198.51.100.7")


def policy(spec: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": namespace}, "spec": spec}


DENY_ALL = policy({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})


def test_no_policy_allows_everything() -> None:
    assert Cluster([], {}).allows(WEB, DB, 5432, "TCP")


def test_default_deny_blocks_both_directions() -> None:
    cluster = Cluster([DENY_ALL], {})
    assert not cluster.allows(WEB, DB, 5432, "TCP")
    assert not cluster.allows(INTERNET, WEB, 8080, "TCP")
    assert not cluster.allows(WEB, INTERNET, 443, "TCP")


def test_both_ends_must_agree() -> None:
    egress = policy(
        {
            "podSelector": {"matchLabels": {"role": "web"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "db"}}}]}],
        }
    )
    assert not Cluster([DENY_ALL, egress], {}).allows(WEB, DB, 5432, "TCP")  # db ingress still denied
    ingress = policy(
        {
            "podSelector": {"matchLabels": {"role": "db"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"role": "web"}}}], "ports": [{"port": "pg"}]}
            ],
        }
    )
    cluster = Cluster([DENY_ALL, egress, ingress], {})
    assert cluster.allows(WEB, DB, 5432, "TCP")
    assert not cluster.allows(WEB, DB, 5432, "UDP"), "protocol defaults to TCP"
    assert not cluster.allows(WEB, DB, 5433, "TCP")


def test_pod_selector_alone_stays_in_the_policy_namespace() -> None:
    egress = policy(
        {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "db"}}}]}],
        }
    )
    cluster = Cluster([egress], {})
    assert cluster.allows(WEB, DB, 5432, "TCP")
    assert not cluster.allows(WEB, OTHER_DB, 5432, "TCP")


@pytest.mark.parametrize(
    ("peers", "reaches_other_db", "reaches_db"),
    [
        # One peer with both selectors: AND.
        (
            [
                {
                    "namespaceSelector": {"matchLabels": {"team": "x"}},
                    "podSelector": {"matchLabels": {"role": "db"}},
                }
            ],
            True,
            False,
        ),
        # Two peers: OR (any pod in team-x namespaces, or db pods here).
        (
            [
                {"namespaceSelector": {"matchLabels": {"team": "x"}}},
                {"podSelector": {"matchLabels": {"role": "db"}}},
            ],
            True,
            True,
        ),
    ],
)
def test_namespace_and_pod_selectors(
    peers: list[dict[str, Any]], reaches_other_db: bool, reaches_db: bool
) -> None:
    egress = policy({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": peers}]})
    cluster = Cluster([egress], {"other": {"team": "x"}})
    assert cluster.allows(WEB, OTHER_DB, 5432, "TCP") is reaches_other_db
    assert cluster.allows(WEB, DB, 5432, "TCP") is reaches_db


def test_ip_block_with_except_matches_only_outside_addresses() -> None:
    egress = policy(
        {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.0/30"]}}]}],
        }
    )
    cluster = Cluster([egress], {})
    assert cluster.allows(WEB, INTERNET, 443, "TCP")
    assert not cluster.allows(WEB, Endpoint("excepted", ip="198.51.100.2"), 443, "TCP")
    assert not cluster.allows(WEB, DB, 5432, "TCP")


def test_rule_without_peers_or_ports_matches_everything() -> None:
    ingress = policy({"podSelector": {"matchLabels": {"role": "web"}}, "ingress": [{}]})
    cluster = Cluster([ingress], {})
    assert cluster.allows(INTERNET, WEB, 1, "UDP")
    assert cluster.allows(DB, WEB, 65535, "TCP")


def test_port_ranges() -> None:
    ingress = policy({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8100}]}]})
    cluster = Cluster([ingress], {})
    assert cluster.allows(INTERNET, WEB, 8080, "TCP")
    assert not cluster.allows(INTERNET, WEB, 8101, "TCP")


def test_policy_types_default_from_the_sections_present() -> None:
    # No policyTypes and no egress section: ingress-only, so egress stays open.
    ingress_only = policy({"podSelector": {}, "ingress": []})
    cluster = Cluster([ingress_only], {})
    assert cluster.allows(WEB, INTERNET, 443, "TCP")
    assert not cluster.allows(INTERNET, WEB, 8080, "TCP")


def test_selector_expressions() -> None:
    labels = {"app": "a", "tier": "t"}
    assert selector_matches(
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}, labels
    )
    assert not selector_matches(
        {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}, labels
    )
    assert selector_matches({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)
    assert selector_matches({}, labels)
    with pytest.raises(ValueError, match="operator"):
        selector_matches({"matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]}, labels)


def test_edges_only_report_the_governed_namespace() -> None:
    edges = Cluster([], {}).edges([WEB, OTHER_DB, INTERNET], [5432], governed_namespace="other")
    assert ("web", "internet", 5432, "TCP") not in edges
    assert ("web", "other-db", 5432, "TCP") in edges
