"""The threads of a load generator: its clients, started together and running until told to stop."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Workers:
    """Threads that run until `stop`: a subclass `spawn`s its clients, which check `_stop`
    between calls. `stop` waits up to `join_timeout` seconds for each to finish its call in flight."""

    def __init__(self, join_timeout: float) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._join_timeout = join_timeout

    def spawn(self, target: Callable[..., object], *args: object, name: str | None = None) -> None:
        self._threads.append(threading.Thread(target=target, args=args, name=name))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending; every command in flight runs to its fate first."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self._join_timeout)
