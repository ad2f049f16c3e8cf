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

The cache is bounded by bytes as well as entries, since a caller chooses how big an answer is
(a vault `get` answers ~1 MiB): at most `max_bytes` in all (default 32 MiB, sized so the
gateway's caches stay well inside its 512 MiB pod limit) and no answer over `max_entry_bytes`
(256 KiB) is kept at all. An answer not kept costs only a round trip on retry: the state
service still answers a repeated request_id from its durable record.

Request ids are **scoped by the tenant** the instance's plugin verified: for an instance
behind an API key or OAuth2 plugin, the id forwarded to the state service is `<request id>`,
U+001F (a separator no client id holds) and `<scope>`, the scope naming the key or the token's
issuer and subject. The state service answers a repeated id with the first command's answer
whatever command comes with it, which is what keeps an application-named id (a CSV row's) from
running twice after its client lost its records: the new sealing gets an answer it cannot open,
"outcome unknown". Unscoped, another tenant who knew or guessed an id (`invoice-42`) could take
it first (the owner's command then got an answer it could not open: its account stuck on an
unsettled call) or read the owner's outcome (accepted, sequence, size) under it. An instance
without gateway authentication (plugin "none") has no tenants to tell apart and keeps one scope:
a caller's client certificate, or none, must not change what an id names (a rerun without the
certificate, or from the Node client, would run the row again). So the scope is per gateway
credential as the plugin names it: a rerun under another API key, after the instance moved
from the "default" plugin to one of its own, or after the OAuth2 issuer string changed, is a
new scope.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import sys
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
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_ENTRY_BYTES = 256 * 1024
#: What an entry costs besides its answer: the key, the timestamp, the dict slot (an estimate).
ENTRY_OVERHEAD = 256


#: Characters of the scope after the separator (96 bits of SHA-256, base64url).
SCOPE_CHARS = 16


#: The principals a plugin verified, which scope request ids (see the module docstring).
SCOPED_KINDS = frozenset({"api-key", "oauth2"})


#: Joins an id and its scope: not printable, so no id a client sends (validation.request_id)
#: can be a scoped one (sent while the instance had no plugin, it would wait for its tenant).
SCOPE_SEPARATOR = "\x1f"


def scoped_request_id(principal_kind: str, principal_key: str, request_id: str) -> str:
    """The id the state service keys `request_id` of this caller by: `<request_id>␟<scope>` for
    a tenant a plugin verified (the scope the last SCOPE_CHARS characters); the id itself on an
    instance without gateway authentication (whose callers are all of that one kind: an
    instance has one plugin)."""
    if principal_kind not in SCOPED_KINDS:
        return request_id
    return f"{request_id}{SCOPE_SEPARATOR}{_scope(principal_key)}"


@functools.lru_cache(maxsize=4096)  # a tenant's scope, not one hash per command
def _scope(principal_key: str) -> str:
    digest = hashlib.sha256(json.dumps(["veil/request-scope/v1", principal_key]).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:SCOPE_CHARS]


def answer_size(value: object) -> int:
    """The bytes an answer holds: its serialized size for a protobuf message."""
    byte_size = getattr(value, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else sys.getsizeof(value)


class Deduplicator(Generic[T]):
    """Single-flight plus a TTL/LRU answer cache, keyed by (instance, request_id, command hash)."""

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        ttl_s: float = DEFAULT_TTL_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        sizer: Callable[[T], int] = answer_size,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._ttl = ttl_s
        self._max_bytes = max_bytes
        self._max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._sizer = sizer
        self._clock = clock
        self._lock = threading.Lock()
        self._done: OrderedDict[Key, tuple[float, T, int]] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[Key, Future[T]] = {}

    @property
    def cached_bytes(self) -> int:
        """The bytes the cached answers hold now (with their per-entry overhead)."""
        with self._lock:
            return self._bytes

    @property
    def cached_entries(self) -> int:
        """How many answers are cached now."""
        with self._lock:
            return len(self._done)

    def run(self, key: Key, work: Callable[[], T], *, wait: float | None = None) -> T:
        """The cached or in-flight answer for `key`, else the result of `work()` (cached on success).

        A duplicate waits at most `wait` seconds for the request in flight (TimeoutError after).
        """
        pending, leader = self.begin(key)
        if not leader:
            return pending.result(timeout=wait)  # re-raises the leader's error: the caller may retry
        try:
            result = work()
        except BaseException as exc:
            self.fail(key, pending, exc)
            raise
        self.finish(key, pending, result)
        return result

    def begin(self, key: Key) -> tuple[Future[T], bool]:
        """The answer for `key` as a future, and whether the caller leads it.

        A cached answer is a done future, a request in flight its leader's future (the caller
        follows: False); otherwise the caller leads (True) and must end it with `finish` or `fail`.
        This is `run` without blocking, for callers that send many requests at once (ExecuteBatch).
        """
        with self._lock:
            cached = self._done.get(key)
            if cached is not None and self._clock() - cached[0] < self._ttl:
                self._done.move_to_end(key)
                done: Future[T] = Future()
                done.set_result(cached[1])
                return done, False
            pending = self._inflight.get(key)
            if pending is not None:
                return pending, False
            pending = Future()
            self._inflight[key] = pending
            return pending, True

    def fail(self, key: Key, pending: Future[T], error: BaseException) -> None:
        """End a request led through `begin` with an error (never cached: a retry goes upstream)."""
        with self._lock:
            if self._inflight.get(key) is pending:
                del self._inflight[key]
        pending.set_exception(error)

    def finish(self, key: Key, pending: Future[T], result: T) -> None:
        """End a request led through `begin` with its answer, cached for identical retries."""
        size = self._sizer(result) + len(key[0]) + len(key[1]) + len(key[2]) + ENTRY_OVERHEAD
        with self._lock:
            if self._inflight.get(key) is pending:
                del self._inflight[key]
            if size <= self._max_entry_bytes:  # a bigger answer is not kept: a retry asks the state
                previous = self._done.pop(key, None)
                if previous is not None:
                    self._bytes -= previous[2]
                self._done[key] = (self._clock(), result, size)
                self._bytes += size
            while self._done and (len(self._done) > self._capacity or self._bytes > self._max_bytes):
                self._bytes -= self._done.popitem(last=False)[1][2]
        pending.set_result(result)
