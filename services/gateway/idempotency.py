"""request_id handling at the gateway: concurrent duplicates coalesce, recent answers are reused.

The state service dedupes durably (a repeated request_id returns the first result); the
gateway must only never break that. So it forwards request_id unchanged, always to the same
shard, and adds two things in front:

* single flight: while a request (instance, request_id) is in flight, an identical retry
  waits for its answer instead of racing it to the state service;
* a bounded, short-lived cache of answers keyed by (instance, request_id, command hash).
  The command hash is part of the key, so a request that reuses an id with *different*
  bytes is never answered from the cache: it goes to the state service, which decides.

Failures are never cached: a retry after an error reaches the state service again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
Key = tuple[str, str, bytes]

DEFAULT_CAPACITY = 10_000
DEFAULT_TTL_S = 600.0


class Deduplicator(Generic[T]):
    """Single-flight plus a TTL/LRU answer cache, keyed by (instance, request_id, command hash)."""

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._done: OrderedDict[Key, tuple[float, T]] = OrderedDict()
        self._inflight: dict[Key, Future[T]] = {}

    def run(self, key: Key, work: Callable[[], T], *, wait: float | None = None) -> T:
        """The cached or in-flight answer for `key`, else the result of `work()` (cached on success).

        A duplicate waits at most `wait` seconds for the request in flight (TimeoutError after).
        """
        with self._lock:
            cached = self._done.get(key)
            if cached is not None and self._clock() - cached[0] < self._ttl:
                self._done.move_to_end(key)
                return cached[1]
            pending = self._inflight.get(key)
            leader = pending is None
            if pending is None:
                pending = Future()
                self._inflight[key] = pending
        if not leader:
            return pending.result(timeout=wait)  # re-raises the leader's error: the caller may retry
        try:
            result = work()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._done[key] = (self._clock(), result)
            while len(self._done) > self._capacity:
                self._done.popitem(last=False)
        pending.set_result(result)
        return result
