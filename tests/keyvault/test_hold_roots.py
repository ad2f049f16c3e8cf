"""HoldRoots and the servicer's `_hold_keys` (hold_keys.py): roots made off the advance path by a
thread that neither a hanging KEK nor close() can turn into a failed or hung advance, a
destroyed key's roots dropped for good, and a version the key never had evicting nothing.
(Written by the second fresh-context review of the change; each failed on b58b881.)"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.keyvault.heads import CommitHead
from veil.services.keyvault.hold_keys import RETRY_AFTER_S, HoldRoots
from veil.services.keyvault.service import KeyvaultServicer

NAME = "instance.inst-1"
DATA_KEY = bytes(range(32))


def _wait(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_get_after_close_answers_none_and_does_not_raise() -> None:
    """keyvault.close() runs hold_roots.close() while handler threads that outlived the grace
    period may still be in AdvanceCommitHead: an advance whose head already moved must still
    answer (an error there stops the state host after one retry)."""
    roots = HoldRoots(lambda _name, _version: DATA_KEY)
    roots.close()
    assert roots.get(NAME, 1) is None
    assert (NAME, 1) not in roots._making  # nothing queued for a maker that is gone


def test_a_root_that_could_not_be_made_is_not_asked_for_on_every_advance() -> None:
    asked: list[int] = []
    now = [0.0]

    def failing(_name: str, version: int) -> bytes:
        asked.append(version)
        raise OSError("the HSM is away")

    roots = HoldRoots(failing, clock=lambda: now[0])
    try:
        assert roots.get(NAME, 1) is None
        assert _wait(lambda: asked == [1] and (NAME, 1) not in roots._making)
        for _ in range(5):
            assert roots.get(NAME, 1) is None  # within the retry delay: not asked again
        now[0] += RETRY_AFTER_S + 1
        assert roots.get(NAME, 1) is None
        assert _wait(lambda: asked == [1, 1])
    finally:
        roots.close()


def test_a_make_that_finishes_after_forget_does_not_bring_the_root_back() -> None:
    """DestroyKey commits while a make is unwrapping (its liveness check passed before): the
    make that completes after forget() must not store the destroyed key's root (nothing would
    forget it again: a destroyed instance never advances any more)."""
    entered, release = threading.Event(), threading.Event()

    def slow_data_key(_name: str, _version: int) -> bytes:
        entered.set()
        release.wait(5)
        return DATA_KEY

    roots = HoldRoots(slow_data_key)
    try:
        assert roots.get(NAME, 1) is None
        assert entered.wait(5)
        roots.forget(NAME)  # the key was destroyed meanwhile
        release.set()
        assert _wait(lambda: (NAME, 1) not in roots._making)
        assert (NAME, 1) not in roots._roots, "a destroyed key's hold root was re-added after forget"
    finally:
        release.set()
        roots.close()


def _servicer(latest_version: int, destroyed: bool = False) -> tuple[KeyvaultServicer, HoldRoots]:
    roots = HoldRoots(lambda _name, _version: DATA_KEY)

    def version_state(_name: str, version: int) -> str:
        if not 1 <= version <= latest_version:
            return "missing"
        return "destroyed" if destroyed else "live"

    kv = SimpleNamespace(keys=SimpleNamespace(version_state=version_state), hold_roots=roots)
    return KeyvaultServicer(kv), roots  # type: ignore[arg-type]


def _request(version: int) -> tuple[keyvault_pb2.AdvanceCommitHeadRequest, CommitHead]:
    head_hash = hashlib.sha256(b"head 2").digest()
    link = envelope_pb2.CommitLink(
        instance_id="inst-1",
        genesis_hash=bytes(32),
        config_hash=bytes(32),
        base=envelope_pb2.CommitHead(sequence=1, hash=bytes(32)),
        head=envelope_pb2.CommitHead(sequence=2, hash=head_hash),
    )
    head = CommitHead(
        instance_id="inst-1",
        sequence=2,
        hash=head_hash,
        genesis_hash=bytes(32),
        config_hash=bytes(32),
        signing_public_key=bytes(32),
        updated_us=0,
    )
    return keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id="inst-1", links=[link], hold_key_version=version
    ), head


def test_a_version_the_key_never_had_does_not_evict_the_live_versions_roots() -> None:
    """A version the key never had (any the host sends) gives no keys and evicts nothing: a
    hostile host alternating version 1 and 2**32-1 must not make the keyvault unwrap the data
    key (the KEK, maybe an HSM) every other advance."""
    servicer, roots = _servicer(latest_version=1)
    try:
        request, head = _request(1)
        enclave_key = bytes(32)
        assert _wait(lambda: bool(servicer._hold_keys(request, head, enclave_key)))
        bogus, _ = _request(2**32 - 1)
        assert servicer._hold_keys(bogus, head, enclave_key) == []
        assert servicer._hold_keys(request, head, enclave_key), (
            "the live version's hold root was dropped by a request for a version the key never had"
        )
    finally:
        roots.close()


def test_the_keys_of_a_live_version_are_the_enclaves_and_a_destroyed_key_gives_none() -> None:
    """The servicer's keys are wire.hold_key over the request's heads and the boot key."""
    servicer, roots = _servicer(latest_version=1)
    try:
        request, head = _request(1)
        enclave_key = bytes([5]) * 32
        assert _wait(lambda: bool(servicer._hold_keys(request, head, enclave_key)))
        [hold] = servicer._hold_keys(request, head, enclave_key)
        assert hold.key == wire.hold_key(wire.hold_root(DATA_KEY), "inst-1", 2, head.hash, enclave_key)
        # Version 0 and a head that is not the request's last head give none.
        assert servicer._hold_keys(_request(0)[0], head, enclave_key) == []
        other = CommitHead(**{**head.__dict__, "sequence": 3})
        assert servicer._hold_keys(request, other, enclave_key) == []
    finally:
        roots.close()
    destroyed, roots = _servicer(latest_version=1, destroyed=True)
    try:
        roots._roots[(NAME, 1)] = wire.hold_root(DATA_KEY)  # made before the key was destroyed
        assert destroyed._hold_keys(request, head, enclave_key) == []
        assert roots._roots == {}
    finally:
        roots.close()


def test_a_hanging_kek_does_not_keep_the_keyvault_process_from_exiting() -> None:
    """An HSM that hangs instead of failing must not keep a stopped keyvault process from
    exiting (the first maker was a ThreadPoolExecutor worker, which the interpreter joins at
    exit)."""
    script = textwrap.dedent(
        """
        import threading
        from veil.services.keyvault.hold_keys import RETRY_AFTER_S, HoldRoots
        entered = threading.Event()
        def hanging(name, version):
            entered.set()
            threading.Event().wait()  # an HSM call that never returns
        roots = HoldRoots(hanging)
        roots.get("instance.x", 1)
        entered.wait(5)
        roots.close()
        print("closed", flush=True)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], check=False, capture_output=True, timeout=10, text=True
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"the process did not exit after close() (stdout: {out!r})") from None
    assert done.returncode == 0, done.stderr
