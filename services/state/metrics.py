"""Counters of the state host: batches, ECALLs, commands, commits, commit latency, head lag.

One thread-safe object shared by the batcher (batch sizes) and the host (ECALLs, commits,
commit-head advances); `snapshot()` is what GetStatus and the benchmark report.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Batch-size histogram buckets: a batch of n counts in the first bucket >= n.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_SAMPLES = 2048


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
    snapshots: int = 0
    compacted_entries: int = 0
    batch_sizes: dict[int, int] = field(default_factory=lambda: dict.fromkeys(BATCH_BUCKETS, 0))
    recovered_entries: int = 0
    recovery_seconds: float = 0.0
    start_up_seconds: float = 0.0
    commit_seconds_total: float = 0.0
    commit_seconds_max: float = 0.0
    _recent_commits: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_batch(self, size: int) -> None:
        """A batch of `size` commands left the queue."""
        bucket = next((b for b in BATCH_BUCKETS if size <= b), BATCH_BUCKETS[-1])
        with self._lock:
            self.batches += 1
            self.commands += size
            self.batch_sizes[bucket] += 1

    def record_execute_ecall(self) -> None:
        """One ExecuteBatch crossing into the enclave."""
        with self._lock:
            self.execute_ecalls += 1

    def record_commit(self, seconds: float, entries: int) -> None:
        """One durable transaction of `entries` log entries took `seconds`."""
        with self._lock:
            self.commits += 1
            self.entries += entries
            self.commit_seconds_total += seconds
            self.commit_seconds_max = max(self.commit_seconds_max, seconds)
            self._recent_commits.append(seconds)

    def record_head_advance(self, ok: bool) -> None:
        """One AdvanceCommitHead attempt at the keyvault."""
        with self._lock:
            if ok:
                self.head_advances += 1
            else:
                self.head_advance_failures += 1

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
                "recovered_entries": self.recovered_entries,
                "recovery_seconds": self.recovery_seconds,
                "start_up_seconds": self.start_up_seconds,
            }
