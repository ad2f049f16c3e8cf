"""Token buckets, request_id deduplication and the receipt hub, as units."""

from __future__ import annotations

import threading
import time

import pytest
from google.rpc import error_details_pb2

from veil.enclave.v1 import envelope_pb2
from veil.services.gateway.idempotency import Deduplicator
from veil.services.gateway.ratelimit import RateLimited, RateLimiter
from veil.services.gateway.receipts import Committed, ReceiptHub


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.acquire("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("alice")
    assert refused.value.retry_after == pytest.approx(0.5)
    limiter.acquire("bob")  # buckets are per client
    clock.now += 0.5
    limiter.acquire("alice")


def test_rate_limited_status_carries_retry_info_and_error_info() -> None:
    status = RateLimited(1.25).to_status()
    assert status.code == 8  # RESOURCE_EXHAUSTED
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    kinds = {detail.type_url.rsplit("/", 1)[-1] for detail in status.details}
    assert kinds == {"google.rpc.RetryInfo", "google.rpc.ErrorInfo"}
    for detail in status.details:
        if detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
        else:
            detail.Unpack(info)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 250_000_000)
    assert info.reason == "RATE_LIMITED"


def test_tracked_clients_are_bounded_and_the_least_recently_seen_go_first() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock(), max_clients=2)  # the clock stands still
    limiter.acquire("a")
    limiter.acquire("b")
    with pytest.raises(RateLimited):
        limiter.acquire("a")  # tracked and empty; seen last now, so b is the oldest
    limiter.acquire("c")  # a third client: b's bucket is dropped, a's kept
    assert limiter.tracked_clients == 2
    with pytest.raises(RateLimited):
        limiter.acquire("a")  # a was not dropped: still empty
    limiter.acquire("b")  # b was dropped: it starts again with a full bucket
    assert limiter.tracked_clients == 2
    with pytest.raises(RateLimited):
        limiter.acquire("b")
    for n in range(100):  # a flood of fresh clients never grows the table past the bound
        limiter.acquire(f"flood-{n}")
    assert limiter.tracked_clients == 2


def test_concurrent_duplicates_run_once_and_share_the_answer() -> None:
    dedupe: Deduplicator[int] = Deduplicator()
    runs = []
    gate = threading.Event()

    def work() -> int:
        runs.append(1)
        gate.wait(5)
        return 42

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(dedupe.run(("i", "r", b"h"), work, wait=5)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join()
    assert results == [42] * 8
    assert len(runs) == 1
    assert dedupe.run(("i", "r", b"h"), work) == 42  # answered from the cache
    assert len(runs) == 1


def test_failures_are_not_cached_and_other_bytes_are_not_coalesced() -> None:
    dedupe: Deduplicator[str] = Deduplicator()
    calls: list[str] = []

    def failing() -> str:
        calls.append("fail")
        raise RuntimeError("upstream down")

    with pytest.raises(RuntimeError):
        dedupe.run(("i", "r", b"h"), failing)
    assert dedupe.run(("i", "r", b"h"), lambda: "ok") == "ok"
    assert dedupe.run(("i", "r", b"other"), lambda: "other bytes") == "other bytes"
    assert calls == ["fail"]


def test_cache_entries_expire() -> None:
    clock = Clock()
    dedupe: Deduplicator[str] = Deduplicator(ttl_s=10, clock=clock)
    dedupe.run(("i", "r", b"h"), lambda: "first")
    clock.now += 11
    assert dedupe.run(("i", "r", b"h"), lambda: "again") == "again"


def _committed(request_id: str, principal: str = "api-key:alice", instance: str = "coins") -> Committed:
    return Committed(instance, request_id, principal, envelope_pb2.CommandOutcome(accepted=True, sequence=7))


def test_hub_delivers_only_the_subscribers_own_outcomes() -> None:
    hub = ReceiptHub()
    hub.publish(_committed("p" * 16 + "-old"))
    stream = hub.subscribe("coins", "p" * 16, "api-key:alice", replay=True, poll=0.05)
    replayed = next(stream)
    assert replayed is not None
    assert replayed.request_id == "p" * 16 + "-old"
    hub.publish(_committed("q" * 16 + "-1"))  # another session's prefix
    hub.publish(_committed("p" * 16 + "-2", principal="api-key:mallory"))  # another principal
    hub.publish(_committed("p" * 16 + "-3", instance="other"))  # another instance
    hub.publish(_committed("p" * 16 + "-4"))
    received = [item for item in (next(stream) for _ in range(3)) if item is not None]
    assert [item.request_id for item in received] == ["p" * 16 + "-4"]
    hub.close()
    assert list(stream) == []
