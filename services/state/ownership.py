"""Instance ownership on the state side: the leases this host holds at the keyvault, renewed.

The keyvault gives at most one state host a lease per instance, with a fencing token it then
requires on that instance's commit-head advances and key releases
(:mod:`veil.services.keyvault.leases`). This host:

* acquires the lease of an instance before it obtains the instance's key, recovers it or
  creates it (start-up skips instances another live host owns: they are served there);
* renews every lease it holds every ``ttl / 4``, up to `RENEWERS` calls at once (a round must
  finish well within a ttl: with 800 instances one call after another at 5 ms a round took the
  whole ttl, and the host let its own leases lapse); a renewal the keyvault refuses (another
  host took over while this one was paused or cut off) loses the instance at once (`on_lost`);
* loses only the token that was refused: a renewal of an old token refused after this host took
  a new one (a re-boot racing the renewal round) does not drop the new lease; a new enclave boot
  keeps the leases the host holds (`keep`) rather than taking new ones;
* gives up serving an instance whose lease it could not renew for a whole ttl (the keyvault
  unreachable): whoever took it meanwhile serves it, and this host's late advances would be
  refused anyway;
* sends the token with every advance and release (:class:`KeyvaultClient` asks `token`).

The holder name is the host's stable node name (``VEIL_STATE_NODE_NAME``, default the host
name; a StatefulSet pod keeps its name across restarts), so a restarted host takes its own
instances back at once instead of waiting for its previous lease to expire.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from veil.services.common.config import ENV_STATE_LEASE_TTL_MS, ENV_STATE_NODE_NAME
from veil.services.common.errors import Unavailable
from veil.services.state.keyvault_client import KeyvaultClient, KeyvaultRefused, KeyvaultUnavailable

_log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_MS = 4_000
MIN_LEASE_TTL_MS, MAX_LEASE_TTL_MS = 1_000, 60_000
LEASE_HELD = "LEASE_HELD"
LEASE_LOST = "LEASE_LOST"
#: Renewal calls in flight at once: a round over n instances at RTT r takes about
#: n * r / RENEWERS, which must stay well under the ttl (README "Losing a machine").
RENEWERS = 32


@dataclass(frozen=True)
class OwnershipConfig:
    """Who this host is to the keyvault, and how long its leases last unrenewed."""

    node_name: str
    ttl_ms: int = DEFAULT_LEASE_TTL_MS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OwnershipConfig:
        env = os.environ if env is None else env
        name = env.get(ENV_STATE_NODE_NAME, "").strip() or socket.gethostname()
        raw = env.get(ENV_STATE_LEASE_TTL_MS, "").strip()
        try:
            ttl = int(raw) if raw else DEFAULT_LEASE_TTL_MS
        except ValueError:
            raise ValueError(f"{ENV_STATE_LEASE_TTL_MS} must be an integer number of milliseconds") from None
        if not MIN_LEASE_TTL_MS <= ttl <= MAX_LEASE_TTL_MS:
            raise ValueError(f"{ENV_STATE_LEASE_TTL_MS} must be {MIN_LEASE_TTL_MS}..{MAX_LEASE_TTL_MS}")
        return cls(node_name=name, ttl_ms=ttl)


class LeaseHeld(Unavailable):
    """Another live host owns the instance (UNAVAILABLE ``LEASE_HELD``: it is served, or being
    created, there; the gateway finds the holder in the keyvault's leases)."""

    default_reason = LEASE_HELD


@dataclass
class _Held:
    token: int
    renewed_at: float  # monotonic time the last granted (re)acquisition was sent


class Ownership:
    """The leases this host holds; thread-safe. `on_lost(instance_id, why)` runs (in the renewal
    thread or the caller's) when one is lost."""

    def __init__(
        self,
        keyvault: KeyvaultClient,
        config: OwnershipConfig,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyvault = keyvault
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self.on_lost: Callable[[str, str], None] = lambda _iid, _why: None
        self._stop = stop or threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self.config.node_name

    # -- acquiring ------------------------------------------------------------------------
    def acquire(self, instance_id: str) -> int:
        """Take the instance's lease (a new fencing token); LeaseHeld when another host owns it,
        KeyvaultUnavailable when the keyvault does not answer."""
        sent = self._clock()
        try:
            lease = self._keyvault.acquire_lease(instance_id, self.holder, self.config.ttl_ms, 0)
        except KeyvaultRefused as exc:
            if exc.reason == LEASE_HELD:
                raise LeaseHeld(exc.message) from None
            raise
        with self._lock:
            self._held[instance_id] = _Held(lease.fencing_token, sent)
        _log.info("owning instance %r (fencing token %d)", instance_id, lease.fencing_token)
        return lease.fencing_token

    def token(self, instance_id: str) -> int:
        """The fencing token held for the instance, or 0 (the keyvault then refuses a leased one)."""
        with self._lock:
            held = self._held.get(instance_id)
            return 0 if held is None else held.token

    def token_or_acquire(self, instance_id: str) -> int:
        """The token held, else a new lease's (a creation: the instance has no owner yet)."""
        return self.token(instance_id) or self.acquire(instance_id)

    def owned(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def keep(self, instance_id: str) -> int:
        """The lease this host holds, renewed under its token (a new enclave boot of this host
        keeps serving under it), else a new one (`acquire`). Taking a new token while the
        renewal round still renews the old one made the keyvault refuse that renewal."""
        held = self.token(instance_id)
        if held:
            sent = self._clock()
            try:
                self._keyvault.acquire_lease(instance_id, self.holder, self.config.ttl_ms, held)
            except KeyvaultRefused as exc:  # (nothing of the new boot serves it yet)
                _log.warning("lost instance %r (fencing token %d): %s", instance_id, held, exc.message)
                self.forget(instance_id, held)
            else:
                self._renewed(instance_id, held, sent)
                return held
        return self.acquire(instance_id)

    def lose(self, instance_id: str, token: int, why: str) -> None:
        """The keyvault refused `token` (a renewal, an advance): forget the lease if that is the
        one held, and tell `on_lost`. A refusal of an older token than the one held now (taken
        since) changes nothing; with no lease held `on_lost` is told again (an instance must not
        be served without one)."""
        with self._lock:
            held = self._held.get(instance_id)
            if held is not None and held.token != token:
                _log.info(
                    "instance %r: fencing token %d refused, but %d is held now: kept",
                    instance_id,
                    token,
                    held.token,
                )
                return
            self._held.pop(instance_id, None)
        if held is not None:
            _log.warning("lost instance %r (fencing token %d): %s", instance_id, held.token, why)
        self.on_lost(instance_id, why)

    def forget(self, instance_id: str, token: int) -> None:
        """Stop holding (and renewing) the lease taken under `token`, without `on_lost`: nothing
        is served under it (e.g. a creation the enclave refused). It expires at the keyvault."""
        with self._lock:
            held = self._held.get(instance_id)
            if held is not None and held.token == token:
                del self._held[instance_id]

    def forget_all_but(self, instance_ids: set[str]) -> None:
        """Stop holding the leases of instances other than `instance_ids` (a new boot serves
        only stored instances: a lease left by a creation that never reached the database)."""
        with self._lock:
            for instance_id in set(self._held) - instance_ids:
                del self._held[instance_id]

    # -- renewing -------------------------------------------------------------------------
    def start(self) -> None:
        """Start renewing (once; it runs until the host's stop event)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def renew_all(self) -> None:
        """One renewal round (the thread runs it every ttl/4), `RENEWERS` calls at a time."""
        with self._lock:
            held = [(instance_id, lease.token) for instance_id, lease in self._held.items()]
        unreachable = threading.Event()  # set, the round's other leases only have their age judged
        if len(held) <= 1:
            for instance_id, token in held:
                self._renew(instance_id, token, unreachable)
            return
        with ThreadPoolExecutor(min(RENEWERS, len(held)), thread_name_prefix="lease-renewal") as pool:
            for done in [pool.submit(self._renew, *lease, unreachable) for lease in held]:
                done.result()

    def _renew(self, instance_id: str, token: int, unreachable: threading.Event) -> None:
        """Renew one lease; its age counts from when its last granted renewal was sent. Once a
        call of the round found the keyvault unreachable, the rest are not sent (a cut-off host
        with many instances would wait a call timeout per `RENEWERS` of them, ttl/4 each)."""
        ttl_s = self.config.ttl_ms / 1000
        with self._lock:
            current = self._held.get(instance_id)
            if current is None or current.token != token:
                return  # lost or taken anew since the round began
            renewed_at = current.renewed_at
        sent = self._clock()
        if sent - renewed_at >= ttl_s:  # e.g. the previous calls hung (a partition)
            self.lose(instance_id, token, "the lease was not renewed for a whole ttl")
            return
        if unreachable.is_set():
            return
        try:
            # A short deadline: a host cut off notices within about a ttl, not a call timeout.
            self._keyvault.acquire_lease(
                instance_id, self.holder, self.config.ttl_ms, token, timeout=ttl_s / 4
            )
        except KeyvaultRefused as exc:
            self.lose(instance_id, token, f"the keyvault refused the lease renewal: {exc.message}")
            return
        except KeyvaultUnavailable as exc:
            unreachable.set()
            if self._clock() - renewed_at >= ttl_s:
                why = f"the lease could not be renewed for a whole ttl ({exc.message})"
                self.lose(instance_id, token, why)
            return
        self._renewed(instance_id, token, sent)

    def _renewed(self, instance_id: str, token: int, sent: float) -> None:
        with self._lock:
            current = self._held.get(instance_id)
            if current is not None and current.token == token:
                current.renewed_at = max(current.renewed_at, sent)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.ttl_ms / 4000):
            try:
                self.renew_all()
            except Exception:
                _log.exception("lease renewal round failed")
