"""Which state replica hosts an instance: explicit placements, a learned directory, rendezvous hashing.

Lookup order for an instance:

1. the explicit shard map (`VEIL_GATEWAY_SHARD_MAP`), fixed by the operator;
2. the directory the gateway learned from CreateInstance answers and ListInstances fan-outs
   (so an instance created before a replica was added is still found where it lives);
3. rendezvous (highest-random-weight) hashing over the replica list: a stable choice that
   moves only about 1/n of new placements when an n-th replica is added.

New instances are placed by 1 then 3. The state service stays authoritative: a NOT_FOUND
from the chosen replica makes the gateway refresh its directory (at most once per
`refresh_interval`) and retry where the instance actually is.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from veil.enclave.v1 import envelope_pb2


@dataclass(frozen=True)
class Placement:
    """An instance the gateway knows of: where it lives and its configuration."""

    instance_id: str
    shard: str
    config: envelope_pb2.InstanceConfig


def rendezvous(instance_id: str, shards: Iterable[str]) -> str:
    """The shard with the highest hash weight for `instance_id` (stable across processes)."""

    def weight(shard: str) -> bytes:
        return hashlib.sha256(shard.encode("utf-8") + b"\0" + instance_id.encode("utf-8")).digest()

    return max(shards, key=weight)


class ShardRouter:
    """Thread-safe instance → shard routing with a learned directory."""

    def __init__(
        self,
        shards: tuple[str, ...],
        explicit: Mapping[str, str] | None = None,
        *,
        refresh_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shards = shards
        self._explicit = dict(explicit or {})
        self._directory: dict[str, Placement] = {}
        self._lock = threading.Lock()
        self._refresh_interval = refresh_interval
        self._last_refresh = float("-inf")
        self._clock = clock

    @property
    def default_shard(self) -> str:
        """The shard answering requests that name no instance."""
        return self.shards[0]

    def placement_for_new(self, instance_id: str) -> str:
        """Where CreateInstance sends a new instance."""
        return self._explicit.get(instance_id) or rendezvous(instance_id, self.shards)

    def route(self, instance_id: str) -> str:
        """Where the instance lives (or would live, if the directory has not seen it)."""
        explicit = self._explicit.get(instance_id)
        if explicit is not None:
            return explicit
        with self._lock:
            known = self._directory.get(instance_id)
        return known.shard if known is not None else rendezvous(instance_id, self.shards)

    def known(self, instance_id: str) -> Placement | None:
        """The directory entry, if the gateway has seen the instance."""
        with self._lock:
            return self._directory.get(instance_id)

    def learn(self, placement: Placement) -> None:
        """Record where an instance lives (from CreateInstance or ListInstances)."""
        with self._lock:
            self._directory[placement.instance_id] = placement

    def replace(self, placements: Iterable[Placement]) -> None:
        """Replace the directory with a complete fan-out listing."""
        fresh = {p.instance_id: p for p in placements}
        with self._lock:
            self._directory = fresh
            self._last_refresh = self._clock()

    def refresh_due(self) -> bool:
        """True when a directory refresh may run now (claims the slot: bounded fan-out rate)."""
        with self._lock:
            now = self._clock()
            if now - self._last_refresh < self._refresh_interval:
                return False
            self._last_refresh = now
            return True
