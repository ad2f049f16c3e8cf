"""Calls a request id may resume: every sealed call, kept *before* it is sent, until settled;
a call its caller named (a request id given to `execute`/`execute_many`) is kept after that
too, with its answer, so the same id gets that answer in any process and is never sealed anew.

A call sealed and sent without a definitive answer may have run, and its sealing stays valid in
the host's hands. Passing its request id again (to `execute` or `execute_many`, in this process
or another one on the same data dir) must resume it with the very same bytes, never seal it
anew: a host that rewrites outer request ids would run a fresh sealing a second time.

`FileCalls` keeps one JSON file per call in `<data_dir>/calls/` (mode 0600: a call keeps its
response key), named by the SHA-256 of its request id, in the Node client's format
(clients/node/veil-client.mjs `FileCalls`, `<data_dir>/node-calls/`); `MemoryCalls` keeps them
for one client object (tests, or an explicit choice).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import DecodeError

from veil.enclave import wire
from veil.enclave.v1 import command_pb2, envelope_pb2
from veil.sdk.errors import VeilClientError
from veil.sdk.files import remove_file, write_json
from veil.sdk.sealing import Opened, SealedRequest

CALLS_DIR = "calls"
#: The Node client's calls in the same data dir (same format): calls the other client kept.
NODE_CALLS_DIR = "node-calls"
_MEMORY_LIMIT = 10_000


@dataclass
class PendingCall:
    """One call: its sealings under one counter, and whether any may have run unseen."""

    instance_id: str
    request_id: str
    counter: int
    call: bytes = b""  # the AppCall, serialized: a request id names one call only
    sealings: list[tuple[SealedRequest, bytes]] = field(default_factory=list)
    ambiguous: bool = False
    account: str = ""
    explicit: bool = False  # named by its caller: kept with its answer once settled
    answer: Opened | None = None  # its definitive answer, once settled

    def same_call(self, other: PendingCall) -> bool:
        """Whether `other` is this call (kept by another process, perhaps under another counter),
        not another call that took the same request id."""
        return (self.instance_id, self.account, self.call) == (other.instance_id, other.account, other.call)

    def hashes(self) -> set[bytes]:
        return {wire.command_hash(s.command.encapsulated_key, s.command.ciphertext) for s, _ in self.sealings}

    def drop(self, sealed: SealedRequest) -> None:
        """The enclave refused `sealed` for good (its own bytes decide it): it can never run."""
        self.sealings = [(s, key) for s, key in self.sealings if s.command != sealed.command]

    def restart(self, counter: int) -> None:
        """The counter was used by another command: none of the sealings can ever run."""
        self.counter, self.sealings, self.ambiguous = counter, [], False


class CallStore(Protocol):
    """Where sealed calls without a definitive answer are kept, by request id."""

    def get(self, request_id: str) -> PendingCall | None: ...

    def put(self, state: PendingCall) -> None:
        """Keep `state` (durably, for a file store) before any of its sealings is sent."""
        ...

    def delete(self, request_id: str) -> None: ...

    def keep(self, state: PendingCall) -> bool:
        """Keep `state` unless the store holds another call under its request id (two calls that
        took one id at once: the first kept owns it); checked and written in one step against
        every other process and thread. Whether it was kept."""
        ...

    def forget_call(self, state: PendingCall) -> None:
        """Drop `state`'s entry, unless it is another call's (the same one step)."""
        ...

    def kept_elsewhere(self, request_id: str) -> bool:
        """Whether another client's store on the same data dir keeps a call by this id."""
        ...

    def pending(self, instance_id: str, account: str) -> list[PendingCall]:
        """The kept calls of one account not settled yet, lowest counter first."""
        ...

    def locked(
        self, instance_id: str, account: str, wait_s: float
    ) -> contextlib.AbstractContextManager[None]:
        """Hold one account's calls for a whole `execute` (or batch) against every other process
        on the same store: two resumptions of one call must each see the other's sealings.
        VeilClientError (nothing sent) when another holds them for over `wait_s`."""
        ...


class MemoryCalls:
    """Calls kept by one client object: every unsettled one, and the newest settled ones up to
    10,000 calls in all (an unsettled call is never dropped: its sealing may still run)."""

    def __init__(self) -> None:
        self._calls: OrderedDict[str, PendingCall] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, request_id: str) -> PendingCall | None:
        with self._lock:
            return self._calls.get(request_id)

    def put(self, state: PendingCall) -> None:
        with self._lock:
            self._put(state)

    def _put(self, state: PendingCall) -> None:
        self._calls.pop(state.request_id, None)
        self._calls[state.request_id] = state
        excess = len(self._calls) - _MEMORY_LIMIT
        if excess > 0:
            settled = [rid for rid, c in self._calls.items() if c.answer is not None][:excess]
            for request_id in settled:
                del self._calls[request_id]

    def delete(self, request_id: str) -> None:
        with self._lock:
            self._calls.pop(request_id, None)

    def keep(self, state: PendingCall) -> bool:
        with self._lock:
            stored = self._calls.get(state.request_id)
            if stored is not None and not stored.same_call(state):
                return False
            self._put(state)
        return True

    def forget_call(self, state: PendingCall) -> None:
        with self._lock:
            stored = self._calls.get(state.request_id)
            if stored is not None and stored.same_call(state):
                del self._calls[state.request_id]

    def locked(
        self, instance_id: str, account: str, wait_s: float
    ) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # one client object: its own per-account lock suffices

    def kept_elsewhere(self, request_id: str) -> bool:
        return False

    def pending(self, instance_id: str, account: str) -> list[PendingCall]:
        with self._lock:
            found = [
                c
                for c in self._calls.values()
                if (c.instance_id, c.account) == (instance_id, account) and c.answer is None
            ]
        return sorted(found, key=lambda c: c.counter)


def render(state: PendingCall) -> dict[str, Any]:
    """A call as JSON (the Node client's `FileCalls.render` fields)."""
    return {
        "request_id": state.request_id,
        "instance_id": state.instance_id,
        "account": state.account,
        "call": state.call.hex(),
        "counter": state.counter,
        "ambiguous": state.ambiguous,
        "explicit": state.explicit,
        "answer": _render_answer(state.answer),
        "attempts": [
            {
                "request_id": sealed.request_id,
                "counter": sealed.counter,
                "response_key": sealed.response_key.hex(),
                "signing_key": signing_key.hex(),
                "suite": sealed.command.suite,
                "encapsulated_key": sealed.command.encapsulated_key.hex(),
                "ciphertext": sealed.command.ciphertext.hex(),
            }
            for sealed, signing_key in state.sealings
        ],
    }


def _render_answer(answer: Opened | None) -> dict[str, Any] | None:
    if answer is None:
        return None
    return {
        "request_id": answer.request_id,
        "accepted": answer.accepted,
        "sequence": answer.sequence,
        "result": answer.result.SerializeToString(deterministic=True).hex(),
        "receipt": answer.receipt.SerializeToString(deterministic=True).hex() if answer.receipt else None,
        "result_lost": answer.result_lost,
    }


def _parse_answer(document: Any) -> Opened | None:
    if document is None:
        return None
    receipt = document["receipt"]
    return Opened(
        request_id=str(document["request_id"]),
        result=command_pb2.CommandResult.FromString(bytes.fromhex(document["result"])),
        receipt=envelope_pb2.Receipt.FromString(bytes.fromhex(receipt)) if receipt is not None else None,
        accepted=document["accepted"] is True,
        sequence=int(document["sequence"]),
        result_lost=document["result_lost"] is True,
    )


def parse(document: Any, request_id: str | None = None) -> PendingCall:
    """The call a `render` document describes (ValueError/KeyError/TypeError when malformed)."""
    if not isinstance(document, dict) or (request_id is not None and document["request_id"] != request_id):
        raise ValueError("another call")
    instance_id, account = str(document["instance_id"]), str(document["account"])
    sealings = [
        (
            SealedRequest(
                instance_id=instance_id,
                request_id=str(a["request_id"]),
                counter=int(a["counter"]),
                account=account,
                response_key=bytes.fromhex(a["response_key"]),
                command=envelope_pb2.SealedCommand(
                    suite=envelope_pb2.HpkeSuite.ValueType(int(a["suite"])),
                    encapsulated_key=bytes.fromhex(a["encapsulated_key"]),
                    ciphertext=bytes.fromhex(a["ciphertext"]),
                ),
            ),
            bytes.fromhex(a["signing_key"]),
        )
        for a in document["attempts"]
    ]
    return PendingCall(
        instance_id=instance_id,
        request_id=str(document["request_id"]),
        counter=int(document["counter"]),
        call=bytes.fromhex(document["call"]),
        sealings=sealings,
        ambiguous=document.get("ambiguous") is True,
        account=account,
        explicit=document.get("explicit") is True,
        answer=_parse_answer(document.get("answer")),
    )


class FileCalls:
    """One file per call in `directory`, written atomically (and flushed) before it is sent."""

    def __init__(self, directory: Path, *, also_pending: Sequence[Path] = ()) -> None:
        self.directory = directory
        # Other clients' stores on the same data dir: their unsettled calls hold counters too.
        self.also_pending = list(also_pending)

    def file(self, request_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(request_id.encode()).hexdigest()}.json"

    def get(self, request_id: str) -> PendingCall | None:
        path = self.file(request_id)
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise VeilClientError(
                f"the call journal {path} is unreadable ({error}); nothing was sent"
            ) from None
        try:
            return parse(document, request_id)
        except (ValueError, KeyError, TypeError, DecodeError, ArithmeticError, RecursionError):
            raise VeilClientError(f"the call journal {path} is malformed; nothing was sent") from None

    def put(self, state: PendingCall) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(self.file(state.request_id), render(state), durable=True, mode=0o600)

    def delete(self, request_id: str) -> None:
        remove_file(self.file(request_id))

    def keep(self, state: PendingCall) -> bool:
        with self._ids_locked():
            stored = self.get(state.request_id)
            if stored is not None and not stored.same_call(state):
                return False
            self.put(state)
        return True

    def forget_call(self, state: PendingCall) -> None:
        with self._ids_locked():
            try:
                stored = self.get(state.request_id)
            except VeilClientError:
                return  # unreadable: not known to be this call's
            if stored is not None and stored.same_call(state):
                self.delete(state.request_id)

    def _ids_locked(self) -> contextlib.AbstractContextManager[None]:
        """Every process's check-then-write of a request id's entry, one at a time. Waited for
        without a limit: it is held for one read and one write, and it is also taken after a call
        was sent, where giving up could only say something untrue ("nothing was sent") or drop
        what must be kept."""
        return self._flocked(self.directory / "ids.lock", None, "the calls' request ids")

    def kept_elsewhere(self, request_id: str) -> bool:
        name = self.file(request_id).name
        return any((directory / name).exists() for directory in self.also_pending)

    def locked(
        self, instance_id: str, account: str, wait_s: float
    ) -> contextlib.AbstractContextManager[None]:
        name = hashlib.sha256(f"{instance_id}\0{account}".encode()).hexdigest()
        return self._flocked(self.directory / f"{name}.lock", wait_s, "this account's calls")

    @contextlib.contextmanager
    def _flocked(self, path: Path, wait_s: float | None, what: str) -> Iterator[None]:
        """flock on `path` (released by the kernel if the process dies, so a crash never wedges
        anything), waited for `wait_s` at most (None: without a limit)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "a") as lock_file:
            if wait_s is None:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            else:
                _flock_within(lock_file, wait_s, f"{what} ({path})")
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def pending(self, instance_id: str, account: str) -> list[PendingCall]:
        found = []
        paths = [p for d in (self.directory, *self.also_pending) if d.is_dir() for p in d.glob("*.json")]
        for path in paths:
            try:
                state = parse(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError, DecodeError, ArithmeticError, RecursionError):
                continue  # not a call this client can read: it names none to resume
            if (state.instance_id, state.account) == (instance_id, account) and state.answer is None:
                found.append(state)
        return sorted(found, key=lambda c: c.counter)


def _flock_within(lock_file: Any, wait_s: float, what: str) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise VeilClientError(
                    f"another process has held {what} for over {wait_s:g} s "
                    "(a call in progress, or a stopped process); nothing was sent"
                ) from None
            time.sleep(0.02)
