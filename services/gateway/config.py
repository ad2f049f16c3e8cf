"""Gateway configuration: state shards, the keyvault, client authentication and limits.

Environment (the gateway reads VEIL_GATEWAY_* only; the names live in veil.services.common.config,
next to the server settings every service has: VEIL_GATEWAY_LISTEN, ..._TLS_CERT and so on):

    VEIL_GATEWAY_PUBLIC_LISTEN     TLS-only listener for clients without a certificate
                                   (default 127.0.0.1:50050; empty disables it)
    VEIL_GATEWAY_STATE_ADDRS       comma-separated state replicas (default: the local one)
    VEIL_GATEWAY_SHARD_MAP         explicit placements "instance=host:port,..." (override hashing)
    VEIL_GATEWAY_KEYVAULT_ADDR     the keyvault (JWKS when a state bundle lacks it)
    VEIL_GATEWAY_AUTH              JSON or YAML file of per-instance authentication plugins
    VEIL_GATEWAY_RATE              sustained requests per second per client (default 200)
    VEIL_GATEWAY_BURST             bucket size per client (default 400)
    VEIL_GATEWAY_MAX_MESSAGE_BYTES largest request accepted (default 1 MiB)
    VEIL_GATEWAY_TIMEOUT_SECONDS   ceiling on the deadline given to the state service (default 30)
    VEIL_GATEWAY_MAX_STREAMS       WatchReceipts streams open at once, in all (default 64; at most
                                   half the 256 worker threads, so unary calls always have threads)
    VEIL_GATEWAY_STREAMS_PER_CLIENT  streams per source address (IPv6: per /64) and per
                                   authenticated principal (default 8)
    VEIL_GATEWAY_STREAM_LIFETIME_SECONDS  a stream then ends UNAVAILABLE STREAM_LIFETIME_REACHED
                                   and the client subscribes again (default 300)
    VEIL_GATEWAY_MAX_CONCURRENT_RPCS  calls running or queued for a thread; beyond it a call is
                                   refused RESOURCE_EXHAUSTED at once (default 1024)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from veil.services.common.config import (
    DEFAULT_PORTS,
    ENV_GATEWAY_AUTH,
    ENV_GATEWAY_BURST,
    ENV_GATEWAY_KEYVAULT_ADDR,
    ENV_GATEWAY_MAX_CONCURRENT_RPCS,
    ENV_GATEWAY_MAX_MESSAGE_BYTES,
    ENV_GATEWAY_MAX_STREAMS,
    ENV_GATEWAY_PUBLIC_LISTEN,
    ENV_GATEWAY_RATE,
    ENV_GATEWAY_SHARD_MAP,
    ENV_GATEWAY_STATE_ADDRS,
    ENV_GATEWAY_STREAM_LIFETIME_SECONDS,
    ENV_GATEWAY_STREAMS_PER_CLIENT,
    ENV_GATEWAY_TIMEOUT_SECONDS,
    ConfigError,
)
from veil.services.gateway.streams import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_LIFETIME_S,
    DEFAULT_STREAMS_PER_CLIENT,
    StreamLimits,
)

# Beside the mTLS main port (DEFAULT_PORTS["gateway"]): the public port, TLS without client certificates.
DEFAULT_PUBLIC_PORT = 50050
DEFAULT_RATE = 200.0
DEFAULT_BURST = 400.0
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_UPSTREAM_TIMEOUT = 30.0
# The transport's own cap (veil.services.common.server) is 4 MiB; a larger gateway limit could never apply.
TRANSPORT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A handler mostly waits for its state replica (an Execute for its batch's commit): with too few
# threads, waiting handlers cap the requests in flight, and so the state's batches.
GATEWAY_WORKERS = 256
DEFAULT_MAX_CONCURRENT_RPCS = 4 * GATEWAY_WORKERS


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
    return value


def _integer(env: Mapping[str, str], name: str, default: int) -> int:
    value = _number(env, name, default)
    if value != int(value):
        raise ConfigError(f"{name} must be a whole number")
    return int(value)


def parse_shard_map(raw: str, shards: tuple[str, ...]) -> dict[str, str]:
    """Parse "instance=host:port,..."; every named address must be one of the shards."""
    placements: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        instance, sep, address = item.partition("=")
        instance, address = instance.strip(), address.strip()
        if not sep or not instance or not address:
            raise ConfigError(f"{ENV_GATEWAY_SHARD_MAP}: {item!r} is not instance=host:port")
        if address not in shards:
            raise ConfigError(
                f"{ENV_GATEWAY_SHARD_MAP}: {address} is not listed in {ENV_GATEWAY_STATE_ADDRS}"
            )
        placements[instance] = address
    return placements


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway's upstreams live and which limits it applies."""

    state_addresses: tuple[str, ...]
    keyvault_address: str
    shard_map: Mapping[str, str] = field(default_factory=dict)
    public_listen: str = ""
    auth_file: Path | None = None
    rate_per_second: float = DEFAULT_RATE
    burst: float = DEFAULT_BURST
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    max_streams: int = DEFAULT_MAX_STREAMS
    streams_per_client: int = DEFAULT_STREAMS_PER_CLIENT
    stream_lifetime: float = DEFAULT_STREAM_LIFETIME_S
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS

    @property
    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            max_streams=self.max_streams,
            per_peer=self.streams_per_client,
            per_principal=self.streams_per_client,
            lifetime=self.stream_lifetime,
        )

    def __post_init__(self) -> None:
        if not self.state_addresses:
            raise ConfigError(f"{ENV_GATEWAY_STATE_ADDRS} must list at least one state address")
        if len(set(self.state_addresses)) != len(self.state_addresses):
            raise ConfigError(f"{ENV_GATEWAY_STATE_ADDRS} lists an address twice")
        if not 0 < self.max_message_bytes <= TRANSPORT_MAX_MESSAGE_BYTES:
            raise ConfigError(
                f"{ENV_GATEWAY_MAX_MESSAGE_BYTES} must be 1 to {TRANSPORT_MAX_MESSAGE_BYTES} bytes"
            )
        if self.burst < 1:
            raise ConfigError(f"{ENV_GATEWAY_BURST} must be at least 1")
        if not 1 <= self.max_streams <= GATEWAY_WORKERS // 2:
            # Each stream holds a worker thread: the other half stays for unary calls.
            raise ConfigError(f"{ENV_GATEWAY_MAX_STREAMS} must be 1 to {GATEWAY_WORKERS // 2}")
        if not 1 <= self.streams_per_client <= self.max_streams:
            raise ConfigError(f"{ENV_GATEWAY_STREAMS_PER_CLIENT} must be 1 to {ENV_GATEWAY_MAX_STREAMS}")
        if self.max_concurrent_rpcs < GATEWAY_WORKERS:
            raise ConfigError(f"{ENV_GATEWAY_MAX_CONCURRENT_RPCS} must be at least {GATEWAY_WORKERS}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env
        raw = env.get(ENV_GATEWAY_STATE_ADDRS, f"127.0.0.1:{DEFAULT_PORTS['state'][0]}")
        shards = tuple(a.strip() for a in raw.split(",") if a.strip())
        if not shards:
            raise ConfigError(f"{ENV_GATEWAY_STATE_ADDRS} must list at least one state address")
        auth = env.get(ENV_GATEWAY_AUTH, "").strip()
        auth_file = Path(auth) if auth else None
        if auth_file is not None and not auth_file.is_file():
            # Fail fast: a missing policy file must not silently open every instance.
            raise ConfigError(f"{ENV_GATEWAY_AUTH} file {auth_file} does not exist")
        return cls(
            state_addresses=shards,
            keyvault_address=env.get(ENV_GATEWAY_KEYVAULT_ADDR, f"127.0.0.1:{DEFAULT_PORTS['keyvault'][0]}"),
            shard_map=parse_shard_map(env.get(ENV_GATEWAY_SHARD_MAP, ""), shards),
            public_listen=env.get(ENV_GATEWAY_PUBLIC_LISTEN, f"127.0.0.1:{DEFAULT_PUBLIC_PORT}").strip(),
            auth_file=auth_file,
            rate_per_second=_number(env, ENV_GATEWAY_RATE, DEFAULT_RATE),
            burst=_number(env, ENV_GATEWAY_BURST, DEFAULT_BURST),
            max_message_bytes=int(_number(env, ENV_GATEWAY_MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES)),
            upstream_timeout=_number(env, ENV_GATEWAY_TIMEOUT_SECONDS, DEFAULT_UPSTREAM_TIMEOUT),
            max_streams=_integer(env, ENV_GATEWAY_MAX_STREAMS, DEFAULT_MAX_STREAMS),
            streams_per_client=_integer(env, ENV_GATEWAY_STREAMS_PER_CLIENT, DEFAULT_STREAMS_PER_CLIENT),
            stream_lifetime=_number(env, ENV_GATEWAY_STREAM_LIFETIME_SECONDS, DEFAULT_STREAM_LIFETIME_S),
            max_concurrent_rpcs=_integer(env, ENV_GATEWAY_MAX_CONCURRENT_RPCS, DEFAULT_MAX_CONCURRENT_RPCS),
        )
