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
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2

_log = logging.getLogger(__name__)

#: Hold roots kept (one per instance key version in use; 32 bytes each).
MAX_ROOTS = 4096


class HoldRoots:
    """Hold roots by (key name, version), made off the callers' path; thread-safe."""

    def __init__(self, data_key: Callable[[str, int], bytes], *, size: int = MAX_ROOTS) -> None:
        """`data_key(name, version)` unwraps a data key version (it may block on the KEK)."""
        self._data_key = data_key
        self._size = size
        self._lock = threading.Lock()
        self._roots: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._making: set[tuple[str, int]] = set()
        self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hold-roots")

    def get(self, name: str, version: int) -> bytes | None:
        """The root if at hand; otherwise None, and it is made for a later call."""
        slot = (name, version)
        with self._lock:
            root = self._roots.get(slot)
            if root is not None:
                self._roots.move_to_end(slot)
                return root
            if slot not in self._making:
                self._making.add(slot)
                self._maker.submit(self._make, slot)
        return None

    def forget(self, name: str) -> None:
        """Drop every root of a key (it was destroyed)."""
        with self._lock:
            for slot in [slot for slot in self._roots if slot[0] == name]:
                del self._roots[slot]

    def close(self) -> None:
        self._maker.shutdown(wait=False, cancel_futures=True)

    def _make(self, slot: tuple[str, int]) -> None:
        try:
            root = wire.hold_root(self._data_key(*slot))
        except Exception as exc:  # (the next advance asks again)
            _log.warning("hold root of %s v%d not made: %s", slot[0], slot[1], exc)
            root = None
        with self._lock:
            self._making.discard(slot)
            if root is not None:
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
