"""Per-client token buckets, and the RESOURCE_EXHAUSTED error that tells a client when to retry.

Each client (see veil.services.gateway.auth.Principal, or the peer address for anonymous callers)
has a bucket of `burst` tokens refilled at `rate` per second; a request takes one. An empty
bucket refuses with RESOURCE_EXHAUSTED carrying `google.rpc.RetryInfo` (when one token will
be back) next to the usual ErrorInfo. The number of tracked clients is bounded: the least
recently seen buckets are dropped first (a dropped bucket is full again, which only errs on
the side of serving).

Keys are scoped so tenants never share a bucket: `api-key:<instance>:<name>` and
`oauth2:["<issuer>","<sub>"]` (built by veil.services.gateway.auth), `peer:<address>` for anonymous
callers. An IPv6 peer is bucketed by its /64: one host is routinely given a whole /64, so a
bucket per /128 would let it mint fresh buckets at will.

With metrics exported (veil.services.common.telemetry), `refusal_counter` counts the refused
calls in `veil.gateway.rate_limited`, by the kind of client (`peer`, `api-key`, `oauth2`,
`certificate`): never by client, which would be unbounded.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.metrics import MeterProvider

from veil.services.common.errors import ResourceExhausted

MAX_TRACKED_CLIENTS = 100_000
PEER_PREFIX = "peer:"
IPV6_BUCKET_PREFIX_LENGTH = 64


def bucket_key(client: str) -> str:
    """The bucket of `client`: itself, except that an IPv6 peer maps to its /64 network."""
    if not client.startswith(PEER_PREFIX):
        return client
    host = client.removeprefix(PEER_PREFIX).removeprefix("ipv4:").removeprefix("ipv6:").strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop a zone id ("fe80::1%eth0")
    except ValueError:
        return client  # not an address (a unix socket path, "ipv4:..."): keep it as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"{PEER_PREFIX}{address.ipv4_mapped}"
        network = ipaddress.IPv6Network((address, IPV6_BUCKET_PREFIX_LENGTH), strict=False)
        return f"{PEER_PREFIX}{network}"
    return f"{PEER_PREFIX}{address}"


class RateLimited(ResourceExhausted):
    """A client exceeded its rate; `retry_after` seconds until a request would pass."""

    default_reason = "RATE_LIMITED"

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            f"rate limit exceeded; retry in {retry_after:.3f}s",
            metadata={"retry_after_ms": str(math.ceil(retry_after * 1000))},
        )
        self.retry_after = retry_after

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        seconds = math.floor(self.retry_after)
        delay = duration_pb2.Duration(seconds=seconds, nanos=int((self.retry_after - seconds) * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
        return status


class RateLimiter:
    """Thread-safe token buckets keyed by client."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """`on_refused(bucket)` is told of every refusal (`refusal_counter`)."""
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)
        self._lock = threading.Lock()
        self._on_refused = on_refused

    @property
    def tracked_clients(self) -> int:
        """How many buckets are kept (at most `max_clients`)."""
        with self._lock:
            return len(self._buckets)

    def acquire(self, client: str) -> None:
        """Take one token for `client`, or raise RateLimited with the wait until the next one."""
        client = bucket_key(client)
        with self._lock:
            now = self._clock()
            tokens, stamp = self._buckets.pop(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - stamp) * self._rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                admitted = True
            else:
                self._buckets[client] = (tokens, now)
                admitted = False
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        if not admitted:
            if self._on_refused is not None:
                self._on_refused(client)
            raise RateLimited((1 - tokens) / self._rate)


def refusal_counter(meter_provider: MeterProvider) -> Callable[[str], None]:
    """An `on_refused` counting refusals in `veil.gateway.rate_limited` by kind of client."""
    counter = meter_provider.get_meter("veil.services.gateway").create_counter(
        "veil.gateway.rate_limited",
        unit="{call}",
        description="Calls refused RESOURCE_EXHAUSTED by the per-client rate limit, by kind of client",
    )

    def count(bucket: str) -> None:
        counter.add(1, {"veil.client.kind": bucket.split(":", 1)[0]})

    return count
