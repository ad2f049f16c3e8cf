"""The command queue: submitters get futures, one worker hands commands over in batches.

Why one worker for the whole host (not one per instance): both resources a batch needs are
serial anyway. The enclave runner answers one ECALL at a time over its pipe, and a database
commit (an fsync for SQLite, a WAL flush for PostgreSQL) costs about the same for one entry
or a thousand. One worker lets a single transaction carry the entries of *every* instance in
the batch (group commit across instances), and it keeps the order of ECALLs and commits
trivially consistent. The process function groups a batch by instance: one ExecuteBatch ECALL
per instance present, one durable transaction for the whole batch.

Batching (adaptive, bounded by BatchLimits):

* a batch holds at most `max_batch` commands;
* the worker never waits for a fuller batch when the host was idle: after `idle_reset_s`
  without commands the target drops to 1, so a lone client pays no linger at all;
* under load the target is the size of the previous batch, i.e. the number of clients that
  were answered together and are likely to come back together (closed-loop clients); the
  worker lingers at most `max_linger_s` for the batch to reach it, and a batch that timed out
  lowers the target to what actually arrived. Commands that queue up while a batch is in the
  enclave or being committed are simply taken together next time, so batches grow with load
  even without lingering.

A submitter's future completes only when the process function returns, which for the host
is after the batch's durable commit: nothing is acknowledged before it is on disk. A result
may be deferred (a future): a strict instance's answers wait for the keyvault's confirmation.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar, Union

from veil.services.state.errors import NotServing
from veil.services.state.metrics import StateMetrics

T = TypeVar("T")
R = TypeVar("R")

Result = Union[R, BaseException, "Future[R]"]
ProcessFn = Callable[[Sequence[T]], Sequence[Result[R]]]
"""Processes one batch; returns one result, exception or deferred result (a future that the
submitter's future then follows) per item, in order (raising fails all)."""

_log = logging.getLogger(__name__)


def _deliver(result: Result[R], target: Future[R]) -> None:
    """Complete `target` with a result, an exception, or (later) as a deferred result completes."""
    if isinstance(result, Future):
        result.add_done_callback(functools.partial(_follow, target=target))
    elif isinstance(result, BaseException):
        target.set_exception(result)
    else:
        target.set_result(result)


def _follow(done: Future[R], target: Future[R]) -> None:
    error = done.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(done.result())


@dataclass(frozen=True)
class BatchLimits:
    """The batcher's bounds."""

    max_batch: int = 256
    max_linger_s: float = 0.002
    idle_reset_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_linger_s < 0 or self.idle_reset_s < 0:
            raise ValueError("max_batch must be >= 1 and times must be >= 0")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]


class Batcher(Generic[T, R]):
    """A queue drained by one worker thread into `process`, in adaptive batches."""

    def __init__(
        self,
        process: ProcessFn[T, R],
        *,
        limits: BatchLimits | None = None,
        metrics: StateMetrics | None = None,
        name: str = "batcher",
        clock: Callable[[], float] = time.monotonic,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        """`after_batch` runs on the worker once a batch's futures are completed (housekeeping
        such as snapshots, kept off the acknowledgement path)."""
        self._process = process
        self._after_batch = after_batch
        self.limits = limits or BatchLimits()
        self.metrics = metrics or StateMetrics()
        self._clock = clock
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._target = 1
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; submissions are accepted from now on."""
        with self._cond:
            self._accepting = True
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new submissions; process (drain) or fail what is queued; wait for the worker."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            if not drain:
                self._fail_queued(NotServing("the state service is stopping"))
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _fail_queued(self, error: BaseException) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(error)

    @property
    def queued(self) -> int:
        """Commands waiting for the worker."""
        with self._cond:
            return len(self._queue)

    # -- submission --------------------------------------------------------------------------
    def submit(self, item: T) -> Future[R]:
        """Queue one item; the future completes once its batch was processed (committed)."""
        future: Future[R] = Future()
        with self._cond:
            if not self._accepting:
                raise NotServing("the state service is not accepting commands")
            self._queue.append(_Pending(item, future))
            self._cond.notify()
        return future

    # -- the worker ----------------------------------------------------------------------------
    def _next_batch(self) -> list[_Pending[T, R]] | None:
        limits = self.limits
        with self._cond:
            waited_from = self._clock()
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None  # stopping and drained
            now = self._clock()
            if now - waited_from >= limits.idle_reset_s:
                self._target = 1  # idle: the first command goes in alone, without linger
            target = min(self._target, limits.max_batch)
            deadline = now + limits.max_linger_s
            while len(self._queue) < target and not self._stopping:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break  # linger over: go with what arrived
                self._cond.wait(remaining)
            size = min(len(self._queue), limits.max_batch)
            # Next target: the clients answered together now will likely return together
            # (it grows with a fuller queue, and shrinks to what arrived after a timeout).
            self._target = size
            return [self._queue.popleft() for _ in range(size)]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.metrics.record_batch(len(live))
            try:
                results = self._process([p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"process returned {len(results)} results for {len(live)} items")
            except BaseException as exc:
                _log.exception("batch of %d failed", len(live))
                for pending in live:
                    pending.future.set_exception(exc)
            else:
                for pending, result in zip(live, results, strict=True):
                    _deliver(result, pending.future)
            if self._after_batch is not None:
                try:
                    self._after_batch()
                except Exception:
                    _log.exception("after-batch housekeeping failed")
