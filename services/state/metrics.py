"""Counters of the state host: batches, ECALLs, commands, commits, commit latency, head lag.

One thread-safe object shared by the batcher (batch sizes) and the host (ECALLs, commits,
commit-head advances); `snapshot()` is what GetStatus and the benchmark report.

`export_to(meter_provider, ...)` (only when metrics are exported, veil.services.common.telemetry)
makes the same `record_*` calls feed OpenTelemetry instruments too: `veil.state.batch.size`,
`veil.state.ecall.duration`, `veil.state.commit.duration` (histograms), `veil.state.head.advances`
(a counter by outcome), `veil.state.holds.released` (a counter by source: the keyvault's hold
keys or a ConfirmHead), and the gauges `veil.state.head.lag` and `veil.state.batcher.queue_depth`.
Without it, a `record_*` call pays one `None` check for them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

# Batch-size histogram buckets: a batch of n counts in the first bucket >= n.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_SAMPLES = 2048
#: Boundaries (seconds) of the ECALL and commit duration histograms: a batch's ECALL or durable
#: commit takes from well under a millisecond (in-process enclave, SQLite) to seconds.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Instruments:
    """The OpenTelemetry instruments StateMetrics feeds when metrics are exported."""

    def __init__(
        self, meter_provider: MeterProvider, *, queue_depth: Callable[[], int], head_lag: Callable[[], int]
    ) -> None:
        meter = meter_provider.get_meter("veil.services.state")
        self.batch_size = meter.create_histogram(
            "veil.state.batch.size",
            unit="{command}",
            description="Commands per batch handed to the enclave",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.ecall_duration, self.commit_duration = (
            meter.create_histogram(
                name, unit="s", description=description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
            )
            for name, description in (
                ("veil.state.ecall.duration", "Duration of one ExecuteBatch ECALL (one instance's batch)"),
                ("veil.state.commit.duration", "Duration of one batch's durable commit of its log entries"),
            )
        )
        self.head_advances = meter.create_counter(
            "veil.state.head.advances",
            unit="{call}",
            description="AdvanceCommitHead calls to the keyvault, by outcome (ok, failed)",
        )
        self.holds_released = meter.create_counter(
            "veil.state.holds.released",
            unit="{hold}",
            description="Strict answers' holds released, by source: keyvault (its hold keys) or "
            "enclave (a ConfirmHead ECALL)",
        )
        meter.create_observable_gauge(
            "veil.state.head.lag",
            callbacks=[_observe(head_lag)],
            unit="{entry}",
            description="Committed log entries the keyvault's commit heads do not cover yet",
        )
        meter.create_observable_gauge(
            "veil.state.batcher.queue_depth",
            callbacks=[_observe(queue_depth)],
            unit="{command}",
            description="Commands waiting for the batcher",
        )


def _observe(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read())]

    return callback


def _percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class StateMetrics:
    """Monotonic counters since start, plus a window of recent commit latencies."""

    batches: int = 0
    commands: int = 0
    execute_ecalls: int = 0
    commits: int = 0
    entries: int = 0
    head_advances: int = 0
    head_advance_failures: int = 0
    holds_released_by_keyvault: int = 0
    holds_released_by_enclave: int = 0
    snapshots: int = 0
    compacted_entries: int = 0
    batch_sizes: dict[int, int] = field(default_factory=lambda: dict.fromkeys(BATCH_BUCKETS, 0))
    recovered_entries: int = 0
    recovery_seconds: float = 0.0
    start_up_seconds: float = 0.0
    commit_seconds_total: float = 0.0
    commit_seconds_max: float = 0.0
    ecall_seconds_total: float = 0.0
    _recent_commits: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _otel: _Instruments | None = None

    def export_to(
        self, meter_provider: MeterProvider, *, queue_depth: Callable[[], int], head_lag: Callable[[], int]
    ) -> None:
        """Feed OpenTelemetry instruments from now on; the gauges read `queue_depth()` and
        `head_lag()` when the meter provider collects."""
        self._otel = _Instruments(meter_provider, queue_depth=queue_depth, head_lag=head_lag)

    def record_batch(self, size: int) -> None:
        """A batch of `size` commands left the queue."""
        bucket = next((b for b in BATCH_BUCKETS if size <= b), BATCH_BUCKETS[-1])
        with self._lock:
            self.batches += 1
            self.commands += size
            self.batch_sizes[bucket] += 1
        if self._otel is not None:
            self._otel.batch_size.record(size)

    def record_execute_ecall(self, seconds: float) -> None:
        """One ExecuteBatch crossing into the enclave took `seconds`."""
        with self._lock:
            self.execute_ecalls += 1
            self.ecall_seconds_total += seconds
        if self._otel is not None:
            self._otel.ecall_duration.record(seconds)

    def record_commit(self, seconds: float, entries: int) -> None:
        """One durable transaction of `entries` log entries took `seconds`."""
        with self._lock:
            self.commits += 1
            self.entries += entries
            self.commit_seconds_total += seconds
            self.commit_seconds_max = max(self.commit_seconds_max, seconds)
            self._recent_commits.append(seconds)
        if self._otel is not None:
            self._otel.commit_duration.record(seconds)

    def record_head_advance(self, ok: bool) -> None:
        """One AdvanceCommitHead attempt at the keyvault."""
        with self._lock:
            if ok:
                self.head_advances += 1
            else:
                self.head_advance_failures += 1
        if self._otel is not None:
            self._otel.head_advances.add(1, {"outcome": "ok" if ok else "failed"})

    def record_holds_released(self, count: int, *, by_keyvault: bool) -> None:
        """`count` holds of command answers released: by the keyvault's hold keys, or by the
        enclave (ConfirmHead). Mostly the enclave's means the keyvault's keys do not match."""
        if not count:
            return
        with self._lock:
            if by_keyvault:
                self.holds_released_by_keyvault += count
            else:
                self.holds_released_by_enclave += count
        if self._otel is not None:
            self._otel.holds_released.add(count, {"source": "keyvault" if by_keyvault else "enclave"})

    def record_snapshot(self, compacted: int) -> None:
        """A snapshot was stored and `compacted` entries deleted behind it."""
        with self._lock:
            self.snapshots += 1
            self.compacted_entries += compacted

    def record_recovery(self, entries: int, seconds: float) -> None:
        """One instance recovered: `entries` log entries verified and replayed in `seconds`."""
        with self._lock:
            self.recovered_entries += entries
            self.recovery_seconds += seconds

    def record_start_up(self, seconds: float) -> None:
        """Start-up (runner, attestation, keys, recovery) took `seconds` to reach SERVING."""
        with self._lock:
            self.start_up_seconds = seconds

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter."""
        with self._lock:
            recent = list(self._recent_commits)
            return {
                "batches": self.batches,
                "commands": self.commands,
                "execute_ecalls": self.execute_ecalls,
                "commits": self.commits,
                "entries": self.entries,
                "head_advances": self.head_advances,
                "head_advance_failures": self.head_advance_failures,
                "holds_released_by_keyvault": self.holds_released_by_keyvault,
                "holds_released_by_enclave": self.holds_released_by_enclave,
                "snapshots": self.snapshots,
                "compacted_entries": self.compacted_entries,
                "batch_sizes": {str(k): v for k, v in self.batch_sizes.items() if v},
                "mean_batch_size": self.commands / self.batches if self.batches else 0.0,
                "ecalls_per_command": self.execute_ecalls / self.commands if self.commands else 0.0,
                "commands_per_commit": self.commands / self.commits if self.commits else 0.0,
                "commit_ms_mean": 1000 * self.commit_seconds_total / self.commits if self.commits else 0.0,
                "commit_ms_p50": 1000 * _percentile(recent, 0.50),
                "commit_ms_p99": 1000 * _percentile(recent, 0.99),
                "commit_ms_max": 1000 * self.commit_seconds_max,
                "ecall_ms_mean": (
                    1000 * self.ecall_seconds_total / self.execute_ecalls if self.execute_ecalls else 0.0
                ),
                "recovered_entries": self.recovered_entries,
                "recovery_seconds": self.recovery_seconds,
                "start_up_seconds": self.start_up_seconds,
            }
