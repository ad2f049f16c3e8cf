"""Admission of WatchReceipts streams: how many a client may hold, in all, and for how long.

The gateway serves on a synchronous gRPC server, where a server stream holds one worker thread
until it ends. Without bounds one anonymous peer opening a few hundred streams takes every
thread and unary calls (Ping, Execute) wait out their deadlines. So:

* at most `max_streams` streams in all, well below the worker count, so unary calls always
  find threads;
* at most `per_peer` streams per source address (an IPv6 /64 counts as one address, keyed as
  the rate limiter keys it) and `per_principal` per authenticated principal (API key, JWT
  subject, certificate); anonymous callers share one principal, so only their address counts;
* every stream ends after `lifetime` seconds with UNAVAILABLE (reason STREAM_LIFETIME_REACHED),
  the status gRPC services use for "reconnect": a client subscribes again, with replay_recent
  to pick up what committed in between.

A refusal is RESOURCE_EXHAUSTED with an ErrorInfo reason and RetryInfo, and costs the caller a
rate-limit token like any other attempt.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from veil.services.common.errors import ResourceExhausted
from veil.services.gateway.ratelimit import PEER_PREFIX, bucket_key

DEFAULT_MAX_STREAMS = 64
DEFAULT_STREAMS_PER_CLIENT = 8
DEFAULT_STREAM_LIFETIME_S = 300.0
#: The wait a refused client is told to observe before trying again.
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on concurrent receipt streams."""

    max_streams: int = DEFAULT_MAX_STREAMS
    per_peer: int = DEFAULT_STREAMS_PER_CLIENT
    per_principal: int = DEFAULT_STREAMS_PER_CLIENT
    lifetime: float = DEFAULT_STREAM_LIFETIME_S

    def __post_init__(self) -> None:
        if min(self.max_streams, self.per_peer, self.per_principal) < 1 or self.lifetime <= 0:
            raise ValueError("stream limits must be positive")


class TooManyStreams(ResourceExhausted):
    """A stream cap is reached; the caller may retry after an existing stream ends."""

    def __init__(self, message: str, *, reason: str, limit: int) -> None:
        super().__init__(
            message,
            reason=reason,
            metadata={"limit": str(limit), "retry_after_ms": str(RETRY_AFTER_S * 1000)},
        )

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_AFTER_S)))
        status.details.append(detail)
        return status


class StreamSlots:
    """Thread-safe counts of open streams, in all, per peer address and per principal."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._peers: Counter[str] = Counter()
        self._principals: Counter[str] = Counter()

    @property
    def open(self) -> int:
        """How many streams hold a slot now."""
        with self._lock:
            return self._total

    def acquire(self, peer: str, principal: str | None) -> Callable[[], None]:
        """Take a slot, or raise TooManyStreams; returns its release (idempotent).

        `peer` is the caller's address ("ipv4:1.2.3.4", "ipv6:[...]"); `principal` its principal
        key, or None for an anonymous caller (counted by address only).
        """
        peer_key = bucket_key(f"{PEER_PREFIX}{peer}")
        with self._lock:
            self._refuse_if_full(peer_key, principal)
            self._total += 1
            self._peers[peer_key] += 1
            if principal is not None:
                self._principals[principal] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._total -= 1
                _decrement(self._peers, peer_key)
                if principal is not None:
                    _decrement(self._principals, principal)

        return release

    def _refuse_if_full(self, peer_key: str, principal: str | None) -> None:
        limits = self.limits
        if principal is not None and self._principals[principal] >= limits.per_principal:
            raise TooManyStreams(
                f"this caller already holds {limits.per_principal} receipt streams, the most allowed; "
                "close one (one stream per instance and session is enough) and retry",
                reason="STREAMS_PER_PRINCIPAL",
                limit=limits.per_principal,
            )
        if self._peers[peer_key] >= limits.per_peer:
            raise TooManyStreams(
                f"this address already holds {limits.per_peer} receipt streams, the most allowed; "
                "close one and retry",
                reason="STREAMS_PER_PEER",
                limit=limits.per_peer,
            )
        if self._total >= limits.max_streams:
            raise TooManyStreams(
                "the gateway holds as many receipt streams as it serves; retry later",
                reason="STREAMS_EXHAUSTED",
                limit=limits.max_streams,
            )


def _decrement(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
