"""The client's small JSON files (pins, counters, contacts, journals): written whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json(path: Path, document: Any, *, durable: bool = False, mode: int | None = None) -> None:
    """Replace `path` with `document` atomically: a crash leaves the old file or the new one,
    never half of one. `durable` flushes it to disk before returning (what must survive a power
    loss before a command is sent); `mode` sets the file's permissions (0o600 for secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def remove_file(path: Path) -> None:
    """Delete `path` if it exists."""
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created if missing): one process at a
    time reads, changes and writes the file it guards."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
