"""Hold keys: what lets the host open a strict instance's held answers without an ECALL.

The enclave seals a strict batch's answers under the hold key of the batch's head
(``wire.hold_key``): an HKDF of the *hold root* of the instance's data key version over the
head and the boot's signing key. Only the enclave and the keyvault hold that data key, so only
they can make it. The keyvault sends the hold keys of an advance's heads with its confirmation,
and only for an advance that succeeded (``hold_keys``): its links are consecutive, each
signed by the attested boot whose token came with them, and either one starts at the stored
head or the last one ends there. Head hashes chain (each entry's hash covers the previous
one), and a boot signs only links of its own chain, so every head of such a path is on the
chain the keyvault holds. A hold key is worth what a confirmation is worth: it releases
answers of heads the keyvault recorded, and nothing else.

The hold root of a key version is made from the unwrapped data key once, in the background
(``HoldRoots``), and kept in memory (never the data key): an advance never waits for the KEK,
which may be an HSM that is slow or away. Until a root is ready an advance answers without
hold keys, and the host has the enclave release those answers (ConfirmHead) as it did before.
A destroyed key's roots are dropped (``forget``), by DestroyKey on this replica and by the first
advance that finds the key destroyed on the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2

_log = logging.getLogger(__name__)

#: Hold roots kept (one per instance key version in use; 32 bytes each).
MAX_ROOTS = 4096
#: How long a version whose root could not be made is left alone (an HSM away is not asked on
#: every advance).
RETRY_AFTER_S = 30.0


class HoldRoots:
    """Hold roots by (key name, version), made by one daemon thread off the callers' path (a KEK
    call that hangs holds up neither an advance nor the process's exit); thread-safe."""

    def __init__(
        self,
        data_key: Callable[[str, int], bytes],
        *,
        size: int = MAX_ROOTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`data_key(name, version)` unwraps a data key version (it may block on the KEK)."""
        self._data_key = data_key
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._roots: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._making: set[tuple[str, int]] = set()
        self._failed: dict[tuple[str, int], float] = {}  # slot -> when to try again
        self._generations: dict[str, int] = {}  # bumped by forget: a make begun before is dropped
        self._queue: queue.SimpleQueue[tuple[tuple[str, int], int] | None] = queue.SimpleQueue()
        self._closed = False
        threading.Thread(target=self._run, name="hold-roots", daemon=True).start()

    def get(self, name: str, version: int) -> bytes | None:
        """The root if at hand; otherwise None, and it is made for a later call."""
        slot = (name, version)
        with self._lock:
            root = self._roots.get(slot)
            if root is not None:
                self._roots.move_to_end(slot)
                return root
            if self._closed or slot in self._making or self._failed.get(slot, 0.0) > self._clock():
                return None
            self._making.add(slot)
            self._queue.put((slot, self._generations.get(name, 0)))
        return None

    def forget(self, name: str) -> None:
        """Drop every root of a key (it was destroyed), and any being made."""
        with self._lock:
            self._generations[name] = self._generations.get(name, 0) + 1
            for slot in [slot for slot in self._roots if slot[0] == name]:
                del self._roots[slot]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._queue.put(None)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            slot, generation = job
            try:
                root: bytes | None = wire.hold_root(self._data_key(*slot))
            except Exception as exc:
                _log.warning("hold root of %s v%d not made (retried in %.0fs): %s", *slot, RETRY_AFTER_S, exc)
                root = None
            with self._lock:
                self._making.discard(slot)
                if root is None:
                    self._failed[slot] = self._clock() + RETRY_AFTER_S
                elif generation == self._generations.get(slot[0], 0):
                    self._failed.pop(slot, None)
                    self._roots[slot] = root
                    while len(self._roots) > self._size:
                        self._roots.popitem(last=False)


def hold_keys(
    links: Sequence[envelope_pb2.CommitLink], enclave_signing_public_key: bytes, root: bytes
) -> list[keyvault_pb2.HoldKey]:
    """The hold keys of the heads of an advance that succeeded along `links` (see the module)."""
    heads = sorted({(link.head.sequence, link.head.hash) for link in links})
    instance_id = links[0].instance_id
    return [
        keyvault_pb2.HoldKey(
            sequence=sequence,
            hash=head_hash,
            key=wire.hold_key(root, instance_id, sequence, head_hash, enclave_signing_public_key),
        )
        for sequence, head_hash in heads
    ]
