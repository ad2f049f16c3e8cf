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

The store also keeps the **high-water mark**: the highest counter this client has sealed per
(instance, account), recorded before the command is sent (`sealed.json` next to
`counters.json`, same shape). A sealing sent without a definitive answer stays valid in the
host's hands, so a new call is sealed above both marks, never at or below a counter whose
sealing may still run (docs/protocol.md, section 6).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from veil.sdk.files import locked, write_json

COUNTERS_FILE = "counters.json"
SEALED_FILE = "sealed.json"


class CounterStore(Protocol):
    """Where the last accepted counter of each (instance, account) is kept."""

    def last(self, instance_id: str, account: str) -> int:
        """The last accepted counter (0 if none is known)."""
        ...

    def record(self, instance_id: str, account: str, counter: int) -> None:
        """Remember `counter` as the last accepted one."""
        ...

    def sealed(self, instance_id: str, account: str) -> int:
        """The highest counter this client sealed (0 if none)."""
        ...

    def seal(self, instance_id: str, account: str, counter: int) -> None:
        """Raise the high-water mark to `counter` (never lowers it); durable before returning."""
        ...

    def unseal(self, instance_id: str, account: str, counter: int) -> None:
        """The sealing under `counter` can never run and nothing above it was sealed: lower the
        mark to `counter - 1`, only if it is still exactly `counter`."""
        ...


class MemoryCounters:
    """Counters for one process."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], int] = {}
        self._sealed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def last(self, instance_id: str, account: str) -> int:
        with self._lock:
            return self._values.get((instance_id, account), 0)

    def record(self, instance_id: str, account: str, counter: int) -> None:
        with self._lock:
            self._values[(instance_id, account)] = counter

    def sealed(self, instance_id: str, account: str) -> int:
        with self._lock:
            return self._sealed.get((instance_id, account), 0)

    def seal(self, instance_id: str, account: str, counter: int) -> None:
        with self._lock:
            key = (instance_id, account)
            self._sealed[key] = max(self._sealed.get(key, 0), counter)

    def unseal(self, instance_id: str, account: str, counter: int) -> None:
        with self._lock:
            if self._sealed.get((instance_id, account)) == counter:
                self._sealed[(instance_id, account)] = counter - 1


class FileCounters:
    """Counters in a JSON file ({instance: {account: last}}), updated under an advisory lock."""

    def __init__(self, path: Path, sealed: Path | None = None) -> None:
        self._path = path
        self._sealed = sealed or path.with_name(SEALED_FILE)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, locked(self._path.with_suffix(".lock")):
            yield

    def _read(self, path: Path | None = None) -> dict[str, dict[str, int]]:
        try:
            document = json.loads((path or self._path).read_text())
        except (OSError, ValueError):
            return {}  # a missing or broken cache only costs a counter resync
        return document if isinstance(document, dict) else {}

    def _value(self, path: Path, instance_id: str, account: str) -> int:
        accounts = self._read(path).get(instance_id, {})
        value = accounts.get(account, 0) if isinstance(accounts, dict) else 0
        return value if isinstance(value, int) else 0

    def _write(self, path: Path, instance_id: str, account: str, counter: int) -> None:
        document = self._read(path)
        if not isinstance(document.get(instance_id), dict):
            document[instance_id] = {}
        document[instance_id][account] = counter
        write_json(path, document, durable=path == self._sealed)

    def last(self, instance_id: str, account: str) -> int:
        with self._locked():
            return self._value(self._path, instance_id, account)

    def record(self, instance_id: str, account: str, counter: int) -> None:
        with self._locked():
            self._write(self._path, instance_id, account, counter)

    def sealed(self, instance_id: str, account: str) -> int:
        with self._locked():
            return self._value(self._sealed, instance_id, account)

    def seal(self, instance_id: str, account: str, counter: int) -> None:
        with self._locked():
            if counter > self._value(self._sealed, instance_id, account):
                self._write(self._sealed, instance_id, account, counter)

    def unseal(self, instance_id: str, account: str, counter: int) -> None:
        with self._locked():
            if self._value(self._sealed, instance_id, account) == counter:
                self._write(self._sealed, instance_id, account, counter - 1)
