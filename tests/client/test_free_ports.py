"""Free port shifts for a second mesh or a cluster lie below the kernel's ephemeral range, where
no outgoing connection can take a port between the free-port check and the bind (a CI run's
cluster gateway once failed to listen that way), and the CLI takes such a shift."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli.main import build_parser
from veil.dev.cluster import Cluster, free_cluster_base
from veil.dev.supervisor import free_port_offset, mesh_ports

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_floor() -> int:
    return int(EPHEMERAL_RANGE.read_text().split()[0])


@pytest.mark.skipif(not EPHEMERAL_RANGE.exists(), reason="no Linux ephemeral port range to check against")
def test_a_free_mesh_offset_keeps_every_port_below_the_ephemeral_range() -> None:
    ports = mesh_ports(free_port_offset())
    assert min(ports) > 1024
    assert max(ports) < _ephemeral_floor()


@pytest.mark.skipif(not EPHEMERAL_RANGE.exists(), reason="no Linux ephemeral port range to check against")
def test_a_free_cluster_base_keeps_every_member_below_the_ephemeral_range(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, nodes=3, keyvaults=2, gateways=2, base=free_cluster_base(3, 2, 2))
    ports = [
        int(address.rsplit(":", 1)[1])
        for member in cluster.members
        for address in (member.address, member.admin_address)
    ]
    assert min(ports) > 1024
    assert max(ports) < _ephemeral_floor()


@pytest.mark.parametrize(
    ("offset", "accepted"), [("-20000", True), ("10000", True), ("-49001", False), ("--5", False)]
)
def test_veil_up_takes_a_negative_port_offset(offset: str, accepted: bool) -> None:
    parser = build_parser()
    if accepted:
        assert parser.parse_args(["up", "--port-offset", offset]).port_offset == int(offset)
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(["up", "--port-offset", offset])
