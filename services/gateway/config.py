"""Gateway configuration: the shard map of state replicas and the keyvault address."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import DEFAULT_PORTS, ENV_KEYVAULT_ADDR, ENV_STATE_ADDRS, ConfigError


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway's upstreams live; shard i is the i-th state address."""

    state_addresses: tuple[str, ...]
    keyvault_address: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env
        raw = env.get(ENV_STATE_ADDRS, f"127.0.0.1:{DEFAULT_PORTS['state'][0]}")
        shards = tuple(a.strip() for a in raw.split(",") if a.strip())
        if not shards:
            raise ConfigError(f"{ENV_STATE_ADDRS} must list at least one state address")
        return cls(shards, env.get(ENV_KEYVAULT_ADDR, f"127.0.0.1:{DEFAULT_PORTS['keyvault'][0]}"))
