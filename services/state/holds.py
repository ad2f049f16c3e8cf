"""Answers the enclave holds until the keyvault vouches for what they depend on, and their release.

The enclave seals every answer of a strict instance (and of any instance not yet registered
for this boot) under a hold key: a command's under the key of the newest head it depends on,
released once the keyvault confirms that head to this boot: by the keyvault itself, which
derives the same key (wire.hold_key) and sends it with its confirmation, or by the enclave
(ConfirmHead) when that key does not match the check the enclave gave with the batch; a query's
under the key of its read round, released by a read fence (the keyvault's statement, asked for
after the read). The host keeps one future per (instance, head) or (instance, read round): batches and
queries wait on it, the confirmation path sets it with the key, and a failed incarnation fails
them all. Keys released a moment before anyone asked are kept briefly, so a late waiter does not
wait for a confirmation that already came: the key bytes only, never the future that waited for
them (a done future keeps its callbacks, and with them every answer of the batch it released:
the heap grew by 90,000 objects a second until 4,096 batches were kept, and its full
collections, 50-150 ms each, were the p99 tail at 64 clients).
"""

from __future__ import annotations

import hmac
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import NamedTuple

from veil.enclave import commands, wire
from veil.enclave.v1 import ecall_pb2, envelope_pb2
from veil.keyvault.v1 import keyvault_pb2

RECENT_RELEASES = 4096


class Vouched(NamedTuple):
    """What the keyvault's hold keys did: how many holds they released, and whether nothing up
    to the confirmed head waits any more."""

    released: int
    settled: bool


class HeldAnswers:
    """Futures of hold keys per (instance, held-until sequence); thread-safe."""

    def __init__(self, recent: int = RECENT_RELEASES) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], Future[bytes]] = {}
        self._released: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._checks: dict[tuple[str, int], bytes] = {}  # of held command answers' keys
        self._recent = recent
        self._failure: BaseException | None = None

    def key(self, instance_id: str, held_until: int) -> Future[bytes]:
        """The future hold key of the answers held until head `held_until`."""
        return self._future((instance_id, held_until))

    def read_key(self, instance_id: str, read_round: int) -> Future[bytes]:
        """The future hold key of the query answers of read round `read_round`."""
        return self._future((instance_id, -read_round))

    def _future(self, slot: tuple[str, int]) -> Future[bytes]:
        with self._lock:
            future = self._waiting.get(slot)
            if future is not None:
                return future
            future = Future()
            released = self._released.get(slot)
            if released is not None:
                future.set_result(released)
            elif self._failure is not None:
                future.set_exception(self._failure)
            else:
                self._waiting[slot] = future
            return future

    def commands_waiting(self, instance_id: str) -> bool:
        """Whether some command answers of the instance wait for a head's confirmation (a fast
        instance's from before the keyvault registered it: they wait although it is live now)."""
        with self._lock:
            return any(iid == instance_id and number > 0 for iid, number in self._waiting)

    def expect(self, instance_id: str, held_until: int, check: bytes) -> None:
        """The enclave's check of the key it held a batch's answers under (wire.hold_key_check):
        a hold key from the keyvault is handed out only if it matches."""
        with self._lock:
            if (instance_id, held_until) not in self._released:
                self._checks[(instance_id, held_until)] = check

    def release(self, instance_id: str, released: list[ecall_pb2.ReleasedHold]) -> int:
        """Hand out the keys the enclave released (waiters run in this thread); how many command
        holds were not released before."""
        return self._hand_out(
            [
                ((instance_id, -hold.read_round if hold.read_round else hold.held_until), bytes(hold.key))
                for hold in released
            ]
        )

    def release_vouched(
        self, instance_id: str, hold_keys: list[keyvault_pb2.HoldKey], sequence: int
    ) -> Vouched:
        """Hand out the keyvault's hold keys that match the enclave's checks. `settled` when none
        of the instance's answers held until heads up to `sequence` waits any more: the enclave's
        release for that confirmation (ConfirmHead) would then free nothing new (it never frees
        a query's read round: a read fence does)."""
        with self._lock:
            matching = [
                ((instance_id, hold.sequence), bytes(hold.key))
                for hold in hold_keys
                if hmac.compare_digest(
                    self._checks.get((instance_id, hold.sequence), b""), wire.hold_key_check(hold.key)
                )
            ]
        released = self._hand_out(matching)
        with self._lock:
            waiting = any(iid == instance_id and 0 < number <= sequence for iid, number in self._waiting)
        return Vouched(released=released, settled=not waiting)

    def _hand_out(self, keys: list[tuple[tuple[str, int], bytes]]) -> int:
        """Release `keys` by slot; how many command holds were not released before."""
        ready, new = [], 0
        with self._lock:
            for slot, key in keys:
                new += slot[1] > 0 and slot not in self._released
                self._released[slot] = key
                self._checks.pop(slot, None)
                waiting = self._waiting.pop(slot, None)
                if waiting is not None:
                    ready.append((waiting, key))
            while len(self._released) > self._recent:
                self._released.popitem(last=False)
        for future, key in ready:
            if not future.done():
                future.set_result(key)
        return new

    def fail_instance(self, instance_id: str, error: BaseException) -> None:
        """The instance is no longer served here (another host owns it): its waiters fail."""
        with self._lock:
            slots = [slot for slot in self._waiting if slot[0] == instance_id]
            waiting = [self._waiting.pop(slot) for slot in slots]
            for slot in [slot for slot in self._checks if slot[0] == instance_id]:
                del self._checks[slot]
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    def fail(self, error: BaseException) -> None:
        """This incarnation ends: every waiter fails with `error`, and so do later ones."""
        with self._lock:
            self._failure = error
            waiting, self._waiting = list(self._waiting.values()), {}
            self._checks.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)


def unwrap(key: bytes, instance_id: str, held_until: int, outcome: envelope_pb2.CommandOutcome) -> None:
    """Replace a held command outcome's sealed response by the client-sealed one inside it."""
    if outcome.sealed_response:
        aad = wire.held_response_aad(instance_id, held_until)
        outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)


def unwrap_read(key: bytes, instance_id: str, read_round: int, outcome: envelope_pb2.CommandOutcome) -> None:
    """Replace a held query outcome's sealed response by the client-sealed one inside it."""
    if outcome.sealed_response:
        aad = wire.held_read_aad(instance_id, read_round)
        outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)
