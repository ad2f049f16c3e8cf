"""Shard routing: explicit placements, rendezvous hashing, and the learned directory."""

from __future__ import annotations

from collections import Counter

import pytest

from veil.enclave.v1 import envelope_pb2
from veil.services.common.config import ConfigError
from veil.services.gateway.config import GatewayConfig, parse_shard_map
from veil.services.gateway.routing import Placement, ShardRouter, rendezvous

SHARDS = ("10.0.0.1:50053", "10.0.0.2:50053", "10.0.0.3:50053")


def test_rendezvous_is_stable_and_spreads_instances() -> None:
    ids = [f"instance-{i}" for i in range(3000)]
    first = {i: rendezvous(i, SHARDS) for i in ids}
    assert first == {i: rendezvous(i, tuple(reversed(SHARDS))) for i in ids}, (
        "order of the list must not matter"
    )
    spread = Counter(first.values())
    assert set(spread) == set(SHARDS)
    assert min(spread.values()) > 800  # about a third each


def test_adding_a_replica_moves_only_a_share_of_placements() -> None:
    ids = [f"instance-{i}" for i in range(3000)]
    before = {i: rendezvous(i, SHARDS) for i in ids}
    after = {i: rendezvous(i, (*SHARDS, "10.0.0.4:50053")) for i in ids}
    moved = [i for i in ids if before[i] != after[i]]
    assert all(after[i] == "10.0.0.4:50053" for i in moved), "instances only move to the new replica"
    assert 500 < len(moved) < 1000  # about a quarter


def test_explicit_map_wins_over_hashing_and_directory() -> None:
    router = ShardRouter(SHARDS, {"payroll": SHARDS[2]})
    router.learn(Placement("payroll", SHARDS[0], envelope_pb2.InstanceConfig()))
    assert router.route("payroll") == SHARDS[2]
    assert router.placement_for_new("payroll") == SHARDS[2]


def test_directory_overrides_hashing_for_known_instances() -> None:
    router = ShardRouter(SHARDS)
    hashed = router.route("ledger")
    elsewhere = next(s for s in SHARDS if s != hashed)
    router.learn(Placement("ledger", elsewhere, envelope_pb2.InstanceConfig()))
    assert router.route("ledger") == elsewhere
    router.replace([])
    assert router.route("ledger") == hashed


def test_directory_refreshes_are_rate_bounded() -> None:
    now = [100.0]
    router = ShardRouter(SHARDS, refresh_interval=1.0, clock=lambda: now[0])
    assert router.refresh_due()
    assert not router.refresh_due()
    now[0] += 1.5
    assert router.refresh_due()


def test_shard_map_parsing() -> None:
    assert parse_shard_map(f"a={SHARDS[0]}, b = {SHARDS[1]}", SHARDS) == {"a": SHARDS[0], "b": SHARDS[1]}
    with pytest.raises(ConfigError, match="not listed"):
        parse_shard_map("a=10.9.9.9:1", SHARDS)
    with pytest.raises(ConfigError, match="instance=host:port"):
        parse_shard_map("a", SHARDS)


def test_gateway_config_from_env() -> None:
    config = GatewayConfig.from_env(
        {
            "VEIL_GATEWAY_STATE_ADDRS": ",".join(SHARDS),
            "VEIL_GATEWAY_SHARD_MAP": f"payroll={SHARDS[1]}",
            "VEIL_GATEWAY_RATE": "5",
            "VEIL_GATEWAY_BURST": "10",
            "VEIL_GATEWAY_MAX_MESSAGE_BYTES": "65536",
        }
    )
    assert config.state_addresses == SHARDS
    assert config.shard_map == {"payroll": SHARDS[1]}
    assert (config.rate_per_second, config.burst, config.max_message_bytes) == (5.0, 10.0, 65536)
    assert config.public_listen == "127.0.0.1:50050"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VEIL_GATEWAY_STATE_ADDRS": " , "}, "at least one"),
        ({"VEIL_GATEWAY_RATE": "fast"}, "must be a number"),
        ({"VEIL_GATEWAY_MAX_MESSAGE_BYTES": str(64 * 1024 * 1024)}, "1 to"),
        ({"VEIL_GATEWAY_AUTH": "/nonexistent/auth.json"}, "does not exist"),
    ],
)
def test_gateway_config_fails_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewayConfig.from_env(env)
