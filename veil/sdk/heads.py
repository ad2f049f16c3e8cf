"""The newest head a client saw acknowledged, per instance: the floor its reads must not go below.

A query's answer reads some head of the instance's log; one older than a head this client already
saw acknowledged is a host serving a stale or rolled-back enclave (docs/protocol.md, `stale-read`).
In memory the floor lasts one process. With a data dir it is also kept in
`<data_dir>/heads.json`, so the CLI (a process per command) and any later client on the same data
dir keep it: loaded when the client starts, merged (the higher head wins) and saved when it
closes. A process that crashes, or a client never closed, keeps its floors to itself, and one
running long does not see the floors another process saved meanwhile. A floor is kept with the
genesis of the instance it was seen on: an instance created anew under the same id (which pins
then refuse, or which the user re-pinned on purpose) starts from nothing instead of refusing
every read.

File format::

    {"<instance id>": {"genesis_hash": "<64 hex>", "head": <sequence>}, ...}

The file is a cache on the client's side of the trust line: a missing or unreadable one only
loses the floor (the enclave's read fences still keep strict instances' reads fresh).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from veil.sdk.files import locked, write_json

HEADS_FILE = "heads.json"

#: (genesis hash, head) per instance id.
Floors = dict[str, tuple[bytes, int]]


class HeadFloors:
    """Floors in memory, loaded from and saved to `path` when one is given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._floors: Floors = _read(path) if path is not None else {}
        self._raised: set[str] = set()  # what this client saw: all that `save` writes

    def floor(self, instance_id: str, genesis_hash: bytes) -> int:
        """The newest head seen acknowledged on this instance (0 for none, or another genesis)."""
        with self._lock:
            kept = self._floors.get(instance_id)
        return kept[1] if kept is not None and kept[0] == genesis_hash else 0

    def saw(self, instance_id: str, genesis_hash: bytes, sequence: int) -> None:
        """Raise the floor to `sequence` (a floor of another genesis is replaced)."""
        with self._lock:
            kept = self._floors.get(instance_id)
            if kept is None or kept[0] != genesis_hash or kept[1] < sequence:
                self._floors[instance_id] = (genesis_hash, sequence)
                self._raised.add(instance_id)

    def save(self) -> None:
        """Merge into the file the floors this client raised (the higher head of one genesis
        wins; the genesis this client saw replaces another), under a lock against other
        processes. Floors it only loaded are left as the file has them now: another process
        may have moved them to a new genesis since. Nothing raised: nothing written."""
        with self._lock:
            mine = {iid: self._floors[iid] for iid in self._raised}
        if self.path is None or not mine:
            return
        with locked(self.path.with_suffix(".lock")):
            floors = _read(self.path)
            for instance_id, (genesis, head) in mine.items():
                kept = floors.get(instance_id)
                if kept is None or kept[0] != genesis or kept[1] < head:
                    floors[instance_id] = (genesis, head)
            write_json(
                self.path,
                {iid: {"genesis_hash": g.hex(), "head": h} for iid, (g, h) in sorted(floors.items())},
            )


def _read(path: Path) -> Floors:
    """The floors in `path`; a missing or malformed file, or entry, is none (a cache)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    floors: Floors = {}
    if not isinstance(document, dict):
        return floors
    for instance_id, entry in document.items():
        try:
            genesis, head = bytes.fromhex(entry["genesis_hash"]), entry["head"]
        except (KeyError, TypeError, ValueError):
            continue
        if isinstance(head, int) and not isinstance(head, bool) and head >= 0:
            floors[str(instance_id)] = (genesis, head)
    return floors
