"""Per-account command counters, tracked by the SDK.

The enclave accepts a command only when its counter is exactly the account's last accepted
counter plus one (the first is 1): replay and reordering protection. A command refused by an
app rule still consumes its counter (it is logged); one refused before execution (cannot be
opened, bad proof, wrong counter) does not.

The SDK keeps the last accepted counter per (instance, account), in memory or in a JSON file
under the data dir so separate `veil` invocations continue where the last one stopped. The
store is only a cache: when it is stale (another device, a lost file, a concurrent process)
the enclave refuses with ABORTED and the account's `CounterState` (next counter, and the hash
of the command that used the last one), sealed to the client; the SDK resumes from there
(veil/sdk/client.py says when that is safe). Commands of one account are sent one at a time per SDK
client, since counters must arrive in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from veil.sdk.files import write_json

COUNTERS_FILE = "counters.json"


class CounterStore(Protocol):
    """Where the last accepted counter of each (instance, account) is kept."""

    def last(self, instance_id: str, account: str) -> int:
        """The last accepted counter (0 if none is known)."""
        ...

    def record(self, instance_id: str, account: str, counter: int) -> None:
        """Remember `counter` as the last accepted one."""
        ...


class MemoryCounters:
    """Counters for one process."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def last(self, instance_id: str, account: str) -> int:
        with self._lock:
            return self._values.get((instance_id, account), 0)

    def record(self, instance_id: str, account: str, counter: int) -> None:
        with self._lock:
            self._values[(instance_id, account)] = counter


class FileCounters:
    """Counters in a JSON file ({instance: {account: last}}), updated under an advisory lock."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self._path.with_suffix(".lock"), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            document = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return {}  # a missing or broken cache only costs a counter resync
        return document if isinstance(document, dict) else {}

    def last(self, instance_id: str, account: str) -> int:
        with self._locked():
            value = self._read().get(instance_id, {}).get(account, 0)
        return value if isinstance(value, int) else 0

    def record(self, instance_id: str, account: str, counter: int) -> None:
        with self._locked():
            document = self._read()
            document.setdefault(instance_id, {})[account] = counter
            write_json(self._path, document)
