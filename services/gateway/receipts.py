"""WatchReceipts: fan committed outcomes out to the subscribers they belong to.

Ownership ("a client's own receipts") is decided by two things the gateway can check
without reading anything sealed:

* the principal: an outcome is delivered only to subscribers authenticated as the same
  principal that submitted it (API key name, JWT subject or certificate identity; anonymous
  callers all share the anonymous principal);
* the request_id prefix: the SDK starts every request_id with a random per-session prefix of
  at least 16 characters (e.g. 24 hex characters, 96 bits) and subscribes with it, so
  anonymous subscribers cannot guess each other's streams.

Outcomes stay sealed under each client's response key; a wrongly delivered one would reveal
only its timing and sequence number. The hub holds the last `recent` outcomes per instance
so a subscriber that connects right after sending can replay them. It sees only commands
that went through this gateway process (a multi-replica deployment needs a state-side feed).

The replay buffer is bounded by bytes across all instances, since a caller chooses how big an
outcome is: at most `max_bytes` (default 32 MiB, well inside the gateway's 512 MiB pod limit),
the oldest outcomes (of any instance) going first, and an outcome over `max_item_bytes`
(256 KiB) is delivered live but not kept for replay (its sender has the answer from Execute).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from veil.enclave.v1 import envelope_pb2

MIN_PREFIX = 16
MAX_PREFIX = 48
DEFAULT_RECENT = 1024
DEFAULT_MAX_SUBSCRIBERS = 1024
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_ITEM_BYTES = 256 * 1024
#: What a kept outcome costs besides its serialized bytes (the object, its slots; an estimate).
ITEM_OVERHEAD = 512
_QUEUE_LIMIT = 4096


@dataclass(frozen=True)
class Committed:
    """One committed outcome as the gateway forwarded it."""

    instance_id: str
    request_id: str
    principal: str
    outcome: envelope_pb2.CommandOutcome


@dataclass(frozen=True)
class _Subscription:
    instance_id: str
    prefix: str
    principal: str
    inbox: queue.Queue[Committed | None]

    def wants(self, item: Committed) -> bool:
        return (
            item.instance_id == self.instance_id
            and item.principal == self.principal
            and item.request_id.startswith(self.prefix)
        )


def committed_size(item: Committed) -> int:
    """The bytes a kept outcome holds (an estimate that grows with what the caller controls)."""
    return (
        item.outcome.ByteSize()
        + len(item.instance_id)
        + len(item.request_id)
        + len(item.principal)
        + ITEM_OVERHEAD
    )


class TooManySubscribers(Exception):
    """The hub is at its subscriber limit."""


class ReceiptHub:
    """Thread-safe publish/subscribe of committed outcomes."""

    def __init__(
        self,
        *,
        recent: int = DEFAULT_RECENT,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    ) -> None:
        self._recent_size = recent
        self._max_subscribers = max_subscribers
        self._max_bytes = max_bytes
        self._max_item_bytes = min(max_item_bytes, max_bytes)
        self._lock = threading.Lock()
        # Kept outcomes in publish order (number -> outcome, size), and each instance's numbers.
        self._kept: OrderedDict[int, tuple[Committed, int]] = OrderedDict()
        self._recent: dict[str, deque[int]] = {}
        self._numbers = itertools.count()
        self._bytes = 0
        self._subscribers: list[_Subscription] = []
        self._closed = False

    @property
    def kept_bytes(self) -> int:
        """The bytes the replay buffer holds now."""
        with self._lock:
            return self._bytes

    def _forget_oldest(self, instance_id: str) -> None:
        """Drop an instance's oldest kept outcome (the caller holds the lock)."""
        numbers = self._recent[instance_id]
        _, size = self._kept.pop(numbers.popleft())
        self._bytes -= size
        if not numbers:
            del self._recent[instance_id]

    def _keep(self, item: Committed) -> None:
        size = committed_size(item)
        if size > self._max_item_bytes:
            return
        number = next(self._numbers)
        self._kept[number] = (item, size)
        self._bytes += size
        numbers = self._recent.setdefault(item.instance_id, deque())
        numbers.append(number)
        if len(numbers) > self._recent_size:
            self._forget_oldest(item.instance_id)
        while self._bytes > self._max_bytes:
            # The globally oldest outcome is also the oldest its instance still keeps.
            oldest, _ = next(iter(self._kept.values()))
            self._forget_oldest(oldest.instance_id)

    def publish(self, item: Committed) -> None:
        """Record an outcome and hand it to every matching subscriber (slow ones drop it)."""
        with self._lock:
            self._keep(item)
            targets = [s for s in self._subscribers if s.wants(item)]
        for subscription in targets:
            # A subscriber that does not read loses outcomes; it never blocks commits.
            with contextlib.suppress(queue.Full):
                subscription.inbox.put_nowait(item)

    def subscribe(
        self, instance_id: str, prefix: str, principal: str, *, replay: bool, poll: float = 0.5
    ) -> Iterator[Committed | None]:
        """Matching outcomes as they come; yields None every `poll` seconds so callers can check liveness."""
        subscription = _Subscription(instance_id, prefix, principal, queue.Queue(_QUEUE_LIMIT))
        with self._lock:
            if self._closed:
                return
            if len(self._subscribers) >= self._max_subscribers:
                raise TooManySubscribers
            kept = (self._kept[number][0] for number in self._recent.get(instance_id, ()))
            backlog = [c for c in kept if subscription.wants(c)] if replay else []
            self._subscribers.append(subscription)
        try:
            yield from backlog
            while True:
                try:
                    item = subscription.inbox.get(timeout=poll)
                except queue.Empty:
                    if self._closed:
                        return
                    yield None
                    continue
                if item is None:  # the hub closed
                    return
                yield item
        finally:
            with self._lock:
                self._subscribers.remove(subscription)

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            with contextlib.suppress(queue.Full):
                subscription.inbox.put_nowait(None)
