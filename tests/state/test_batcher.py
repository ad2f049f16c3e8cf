"""The batcher with a fake process function: bounds, adaptivity, acknowledgement after commit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import pytest

from veil.services.state.batcher import Batcher, BatchLimits
from veil.services.state.errors import NotServing


class FakeCommit:
    """Records each batch, optionally holds it (an fsync in progress), returns item * 10."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list[int]] = []
        self.committed: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.entered.set()
        self.gate.wait(10)
        if self.seconds:
            time.sleep(self.seconds)
        self.batches.append(list(items))
        self.committed.update(items)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


@pytest.fixture
def commit() -> FakeCommit:
    return FakeCommit()


class MakeBatcher(Protocol):
    def __call__(self, limits: BatchLimits | None = None) -> Batcher[int, int]: ...


@pytest.fixture
def make_batcher(commit: FakeCommit) -> Iterator[MakeBatcher]:
    started: list[Batcher[int, int]] = []

    def make(limits: BatchLimits | None = None) -> Batcher[int, int]:
        batcher: Batcher[int, int] = Batcher(commit, limits=limits)
        batcher.start()
        started.append(batcher)
        return batcher

    yield make
    commit.gate.set()
    for batcher in started:
        batcher.stop(timeout=5)


def test_a_future_completes_only_after_its_batch_is_committed(
    make_batcher: MakeBatcher, commit: FakeCommit
) -> None:
    batcher = make_batcher()
    commit.gate.clear()
    future = batcher.submit(7)
    assert commit.entered.wait(5)
    time.sleep(0.05)
    assert not future.done()  # in the enclave / being committed: not acknowledged
    assert 7 not in commit.committed
    commit.gate.set()
    assert future.result(5) == 70
    assert 7 in commit.committed


def test_a_lone_client_pays_no_linger(make_batcher: MakeBatcher, commit: FakeCommit) -> None:
    # A huge linger would show in every latency if the worker waited for company.
    batcher = make_batcher(BatchLimits(max_batch=64, max_linger_s=0.5, idle_reset_s=0.05))
    for i in range(5):
        time.sleep(0.06)  # idle between requests
        started = time.monotonic()
        assert batcher.submit(i).result(5) == i * 10
        assert time.monotonic() - started < 0.45  # less than the 0.5 s linger it would pay
    assert all(len(b) == 1 for b in commit.batches)


def test_concurrent_clients_are_grouped_into_few_batches(commit: FakeCommit) -> None:
    commit.seconds = 0.003  # each commit costs like an fsync
    batcher: Batcher[int, int] = Batcher(commit, limits=BatchLimits(max_batch=256, max_linger_s=0.005))
    batcher.start()
    clients, rounds = 32, 10

    def client(n: int) -> None:
        for r in range(rounds):
            assert batcher.submit(n * 1000 + r).result(10) == (n * 1000 + r) * 10

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    batcher.stop()
    total = clients * rounds
    assert sum(len(b) for b in commit.batches) == total
    # Without batching there would be one commit per command.
    assert len(commit.batches) <= total / 8, f"{len(commit.batches)} commits for {total} commands"
    snapshot = batcher.metrics.snapshot()
    assert snapshot["commands"] == total
    assert snapshot["batches"] == len(commit.batches)
    assert snapshot["mean_batch_size"] >= 8


def _queued_behind_a_held_commit(
    batcher: Batcher[int, int], commit: FakeCommit, first: int, queued: Iterable[int]
) -> tuple[Future[int], list[Future[int]]]:
    """Submit `first` and hold its commit (the gate stays shut), then queue `queued` behind it."""
    commit.gate.clear()
    running = batcher.submit(first)
    assert commit.entered.wait(5)
    return running, [batcher.submit(i) for i in queued]


def test_batches_never_exceed_the_maximum(make_batcher: MakeBatcher, commit: FakeCommit) -> None:
    batcher = make_batcher(BatchLimits(max_batch=50, max_linger_s=0.001))
    first, futures = _queued_behind_a_held_commit(batcher, commit, 0, range(1, 181))
    assert batcher.queued == 180
    commit.gate.set()
    assert [f.result(5) for f in [first, *futures]] == [i * 10 for i in range(181)]
    assert max(len(b) for b in commit.batches) == 50
    assert [len(b) for b in commit.batches[1:]] == [50, 50, 50, 30]  # order kept, bounded


def test_the_target_follows_the_previous_batch(make_batcher: MakeBatcher, commit: FakeCommit) -> None:
    # After a batch of 8, the worker waits (up to the linger) for 8 again, even if they trickle in.
    batcher = make_batcher(BatchLimits(max_batch=64, max_linger_s=1.0, idle_reset_s=5.0))
    first, burst = _queued_behind_a_held_commit(batcher, commit, 100, range(8))
    commit.gate.set()
    [f.result(5) for f in [first, *burst]]
    trickle: list[Future[int]] = []
    for i in range(8):
        trickle.append(batcher.submit(200 + i))
        time.sleep(0.01)
    [f.result(5) for f in trickle]
    assert commit.batches[-1] == [200 + i for i in range(8)]


def test_a_failed_item_fails_alone(make_batcher: MakeBatcher) -> None:
    batcher = make_batcher()
    good, bad = batcher.submit(1), batcher.submit(-1)
    assert good.result(5) == 10
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(5)


def test_a_failed_batch_fails_every_future() -> None:
    def broken(items: Sequence[int]) -> list[int | BaseException]:
        raise OSError("disk full")

    batcher: Batcher[int, int] = Batcher(broken)
    batcher.start()
    futures = [batcher.submit(i) for i in range(3)]
    for future in futures:
        with pytest.raises(OSError, match="disk full"):
            future.result(5)
    batcher.stop()


def test_a_wrong_number_of_results_fails_the_batch() -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: [1])
    batcher.start()
    futures = [batcher.submit(i) for i in range(2)]
    time.sleep(0.01)
    for future in futures:
        with pytest.raises(RuntimeError, match="results"):
            future.result(5)
    batcher.stop()


def test_stop_drains_what_was_queued_and_refuses_more(make_batcher: MakeBatcher, commit: FakeCommit) -> None:
    batcher = make_batcher()
    commit.gate.clear()
    futures = [batcher.submit(i) for i in range(10)]
    assert commit.entered.wait(5)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.02)
    with pytest.raises(NotServing):
        batcher.submit(99)
    commit.gate.set()
    stopper.join(5)
    assert [f.result(0) for f in futures] == [i * 10 for i in range(10)]


def test_stop_without_drain_fails_queued_commands(make_batcher: MakeBatcher, commit: FakeCommit) -> None:
    batcher = make_batcher()
    running, queued = _queued_behind_a_held_commit(batcher, commit, 0, range(1, 5))
    stopper = threading.Thread(target=lambda: batcher.stop(drain=False))
    stopper.start()
    time.sleep(0.02)
    commit.gate.set()
    stopper.join(5)
    assert running.result(0) == 0  # the batch in flight still commits
    for future in queued:
        with pytest.raises(NotServing):
            future.result(0)
    assert commit.committed == {0}


def test_submitting_before_start_is_refused(commit: FakeCommit) -> None:
    with pytest.raises(NotServing):
        Batcher(commit).submit(1)


def test_the_histogram_counts_batch_sizes(make_batcher: MakeBatcher, commit: FakeCommit) -> None:
    batcher = make_batcher(BatchLimits(max_batch=256, max_linger_s=0.0))
    first, rest = _queued_behind_a_held_commit(batcher, commit, 0, range(1, 6))
    commit.gate.set()
    [f.result(5) for f in [first, *rest]]
    snapshot = batcher.metrics.snapshot()
    assert snapshot["batch_sizes"] == {"1": 1, "8": 1}
    assert snapshot["commands"] == 6


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        BatchLimits(max_batch=0)
