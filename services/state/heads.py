"""Advancing commit heads at the keyvault, in the background, coalesced, retried until caught up.

What the keyvault is sent: the enclave signs a `CommitLink` per batch, from the previous head
to the new one. This thread keeps each instance's links since the last head the keyvault
confirmed and sends them as one path (coalesced: a keyvault that was away is caught up with
one call per instance). The keyvault compares and sets: one link must start at its stored
head. It answers with a signed `HeadConfirmation` and the hold keys of the path's heads, which
go to `on_confirmed` (the host opens a strict instance's held answers with the hold keys, and
hands the confirmation to the enclave when they do not suffice or its holds pile up).

What an acknowledgement means:

* **strict** instances (the default): the enclave itself holds every answer until the keyvault
  confirms a head that covers it, so an answer a client holds can never be rolled back by a
  host that replays an old database. The cost is one keyvault round trip per round of
  advances, pipelined with the next batches (rounds are not paced: one is always in flight
  while there is something to send).
* **fast** instances: answers go out once the batch is durable in the database; heads are
  advanced after (optionally paced by `pace_s`, so that more batches coalesce per round). The
  entries committed but not yet covered by the keyvault head (the lag, in GetStatus) are what
  a host that rolled its database back could lose. An optional bound
  (VEIL_STATE_MAX_HEAD_LAG) makes the host refuse new commands (UNAVAILABLE) once an instance
  lags that far.

A refusal by the keyvault (after one retry with a fresh attestation) means it considers our
log a fork or a rollback, or this enclave not allowed: the host stops serving (FAILED). A
LEASE_LOST refusal means another host took the instance over (this one was paused or cut off):
the host stops serving that instance only, and its held answers are never released. A read
fence the enclave refuses (the keyvault's head not on its chain) is the same loss when another
host holds the instance's lease now, and otherwise a refusal (startup.py, `_taken_over`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state.keyvault_client import KeyvaultClient, KeyvaultRefused, KeyvaultUnavailable
from veil.services.state.metrics import StateMetrics

_log = logging.getLogger(__name__)

# Rounds coalesce by themselves (one is in flight while the next links gather); a pause between
# rounds trades head lag (and strict answers' latency) for keyvault CPU. Off by default.
ADVANCE_PACE_S = 0.0
#: How long the advancer waits without work after a confirmation before `on_idle` (the host then
#: hands the enclave the confirmations it skipped, so an idle instance keeps no holds there).
IDLE_AFTER_S = 0.5
#: The keyvault's refusals that mean another host owns the instance now (leases, ownership.py).
LEASE_REFUSALS = frozenset({"LEASE_LOST", "LEASE_UNKNOWN"})
MAX_LINKS = 1024  # per AdvanceCommitHead (the keyvault's bound); a longer path takes more rounds
# Rounds failed in a row before the log says so, and then every how many (5 min at the longest
# backoff): a keyvault away holds every strict answer and nothing else would say so; a few
# failures are the retries doing their job.
WARN_AFTER_FAILURES = 3
WARN_EVERY_FAILURES = 60


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between retries."""

    initial_s: float = 0.2
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1)))


class HeadAdvancer:
    """One background thread pushing each instance's unconfirmed links to the keyvault."""

    def __init__(
        self,
        keyvault: KeyvaultClient,
        token: Callable[[bool], str],
        *,
        metrics: StateMetrics,
        on_refused: Callable[[str, str], None],
        on_confirmed: Callable[[keyvault_pb2.AdvanceCommitHeadResponse], object],
        read_fence: Callable[[str], int] | None = None,
        on_lost: Callable[[str, int, str], None] | None = None,
        fencing: Callable[[str], int] = lambda _instance_id: 0,
        backoff: Backoff | None = None,
        pace_s: float = ADVANCE_PACE_S,
        on_idle: Callable[[], object] | None = None,
    ) -> None:
        """`token(fresh)` returns an attestation token (a new one when `fresh`); `read_fence(id)`
        runs one read fence for an instance and returns the read rounds still waiting;
        `on_lost(id, token, why)` is told when the keyvault refused an advance under fencing
        token `token` (`fencing(id)` just before the call) because another host owns the
        instance now (LEASE_LOST: this host stops serving that instance only)."""
        self._keyvault = keyvault
        self._pace_s = pace_s
        self._on_idle = on_idle
        self._idle_due = False  # a head was confirmed since on_idle last ran
        self._token = token
        self._metrics = metrics
        self._on_refused = on_refused
        self._on_confirmed = on_confirmed
        self._read_fence = read_fence
        self._on_lost = on_lost
        self._fencing = fencing
        # Instances whose queries wait for a read fence; True: worth a fence now (asked for, or
        # a head was just confirmed), False: waiting for their heads' confirmation.
        self._reads: dict[str, bool] = {}
        self._backoff = backoff or Backoff()
        self._cond = threading.Condition()
        self._paths: dict[str, list[envelope_pb2.CommitLink]] = {}
        self._hold_key_versions: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._committed: dict[str, int] = {}
        self._problem: str | None = None
        self._busy = False  # a round is being sent
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="head-advancer", daemon=True)

    # -- inputs ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0, *, flush_s: float = 0.0) -> None:
        """Stop the thread, first giving pending links up to `flush_s` to reach the keyvault."""
        with self._cond:
            if flush_s > 0:
                self._cond.wait_for(lambda: not self._paths and not self._busy, flush_s)
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def confirm(self, instance_id: str, sequence: int) -> None:
        """Record a head the keyvault is known to hold (from recovery)."""
        with self._cond:
            self._confirmed[instance_id] = max(self._confirmed.get(instance_id, 0), sequence)
            self._committed[instance_id] = max(self._committed.get(instance_id, 0), sequence)

    def push(self, link: envelope_pb2.CommitLink, hold_key_version: int = 0) -> None:
        """A link whose entries are durably committed; it extends the instance's path.
        `hold_key_version`: the data key version the enclave held its answers under (the
        keyvault's hold keys are asked for in the newest one pushed)."""
        with self._cond:
            instance_id, sequence = link.instance_id, link.head.sequence
            if hold_key_version:
                self._hold_key_versions[instance_id] = hold_key_version
            self._committed[instance_id] = max(self._committed.get(instance_id, 0), sequence)
            path = self._paths.setdefault(instance_id, [])
            if path and path[-1].head != link.base:
                broken = (
                    f"instance {instance_id!r}: the link to {sequence} does not extend "
                    f"the link to {path[-1].head.sequence}"
                )
                _log.error("%s (a host bug)", broken)
                self._on_refused(instance_id, broken)
                return
            path.append(link)
            self._cond.notify_all()

    def request_read(self, instance_id: str) -> None:
        """Queries of the instance wait for a read fence: run one soon (rounds coalesce)."""
        with self._cond:
            self._reads[instance_id] = True
            self._cond.notify_all()

    def note_durable(self, instance_id: str, sequence: int) -> None:
        """Entries up to `sequence` are in the database even though no link covers them yet."""
        with self._cond:
            self._committed[instance_id] = max(self._committed.get(instance_id, 0), sequence)

    # -- outputs -----------------------------------------------------------------------------
    def confirmed(self, instance_id: str) -> int:
        """The highest sequence the keyvault holds for the instance (as far as we know)."""
        with self._cond:
            return self._confirmed.get(instance_id, 0)

    def wait_confirmed(self, instance_id: str, sequence: int, timeout: float) -> bool:
        """Wait up to `timeout` for the keyvault to hold `sequence` (or beyond); False if not."""
        with self._cond:
            return self._cond.wait_for(lambda: self._confirmed.get(instance_id, 0) >= sequence, timeout)

    def lag(self, instance_id: str) -> int:
        """Committed entries not yet covered by the keyvault head."""
        with self._cond:
            return self._committed.get(instance_id, 0) - self._confirmed.get(instance_id, 0)

    def total_lag(self) -> int:
        with self._cond:
            return self._lag_locked()

    def problem(self) -> str | None:
        """Why heads are not advancing right now (e.g. the keyvault is unreachable), or None."""
        with self._cond:
            return self._problem

    # -- the thread ----------------------------------------------------------------------------
    def _next(self) -> tuple[dict[str, list[envelope_pb2.CommitLink]], list[str]] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or bool(self._paths) or any(self._reads.values()))
            if self._stopping:
                return None
            self._busy = True
            reads = [iid for iid, ready in self._reads.items() if ready]
            return {iid: path[:MAX_LINKS] for iid, path in self._paths.items()}, reads

    def _settle(self, instance_id: str, sequence: int) -> None:
        """The keyvault holds `sequence`: drop the links it covers."""
        with self._cond:
            self._confirmed[instance_id] = max(self._confirmed.get(instance_id, 0), sequence)
            path = [link for link in self._paths.get(instance_id, []) if link.head.sequence > sequence]
            if path:
                self._paths[instance_id] = path
            else:
                self._paths.pop(instance_id, None)
            if instance_id in self._reads:
                self._reads[instance_id] = True  # reads that waited for this head may pass now
            self._problem = None
            self._cond.notify_all()

    def _idle(self) -> bool:
        """Whether no work came for IDLE_AFTER_S (and the advancer is not stopping)."""
        with self._cond:
            return not self._cond.wait_for(
                lambda: self._stopping or bool(self._paths) or any(self._reads.values()), IDLE_AFTER_S
            )

    def _run(self) -> None:
        failures = 0
        while True:
            if self._idle_due and self._on_idle is not None and self._idle():
                self._idle_due = False
                try:
                    self._on_idle()
                except Exception as exc:
                    _log.warning("idle confirmations not handed over: %s", exc)
            work = self._next()
            if work is None:
                return
            paths, reads = work
            unreachable = False
            for instance_id in reads:
                unreachable |= self._fence(instance_id) == "unreachable"
            for instance_id, links in paths.items():
                try:
                    outcome = self._advance(instance_id, links)
                except Exception as exc:  # e.g. re-attesting failed in the enclave: retry later
                    _log.warning(
                        "commit head %s@%d not advanced: %s", instance_id, links[-1].head.sequence, exc
                    )
                    outcome = "unreachable"
                unreachable |= outcome == "unreachable"
                self._idle_due |= outcome == "ok"
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            if not unreachable:
                failures = 0
                if self._pace_s > 0:
                    with self._cond:  # pace the keyvault; stop() still wakes us
                        self._cond.wait_for(lambda: self._stopping, self._pace_s)
                continue
            failures += 1
            if failures == WARN_AFTER_FAILURES or failures % WARN_EVERY_FAILURES == 0:
                _log.warning(
                    "commit heads and read fences have failed %d rounds in a row (retrying): %s",
                    failures,
                    self.problem() or "see the warnings above",  # not the keyvault: an error logged there
                )
            with self._cond:
                # Sleep, but wake for stop(); new links just join their paths meanwhile.
                self._cond.wait_for(lambda: self._stopping, self._backoff.delay(failures))

    def _fence(self, instance_id: str) -> str:
        """One read fence for the instance; its reads stay pending while some wait for heads."""
        with self._cond:
            self._reads[instance_id] = False
        if self._read_fence is None:
            return "ok"
        try:
            waiting = self._read_fence(instance_id)
        except KeyvaultUnavailable as exc:
            with self._cond:
                self._reads[instance_id] = True
                self._problem = f"{exc.message}; reads wait for a read fence"
            return "unreachable"
        except Exception as exc:
            _log.warning("read fence of %s failed (retried): %s", instance_id, exc)
            with self._cond:
                self._reads[instance_id] = True
            return "unreachable"
        with self._cond:
            if waiting <= 0 and not self._reads.get(instance_id):
                self._reads.pop(instance_id, None)  # (-1: refused; the incarnation is ending)
        return "ok"

    def _advance(self, instance_id: str, links: list[envelope_pb2.CommitLink]) -> str:
        sequence = links[-1].head.sequence
        for fresh in (False, True):
            fencing = self._fencing(instance_id)  # what the client sends (unless taken anew since)
            try:
                version = self._hold_key_versions.get(instance_id, 0)
                advanced = self._keyvault.advance_commit_head(links, self._token(fresh), version)
            except KeyvaultUnavailable as exc:
                self._metrics.record_head_advance(ok=False)
                with self._cond:
                    self._problem = f"{exc.message}; commit heads lag by {self._lag_locked()} entries"
                return "unreachable"
            except KeyvaultRefused as exc:
                self._metrics.record_head_advance(ok=False)
                if exc.reason in LEASE_REFUSALS and self._on_lost is not None:
                    # Another host owns the instance: these links are never confirmed, so the
                    # answers the enclave holds for them are never released by this host.
                    _log.warning("instance %s@%d fenced off: %s", instance_id, sequence, exc.message)
                    with self._cond:
                        self._paths.pop(instance_id, None)
                        self._reads.pop(instance_id, None)
                        self._hold_key_versions.pop(instance_id, None)
                    self._on_lost(instance_id, fencing, exc.message)
                    return "lost"
                if not fresh:
                    continue  # maybe an expired token: once more with a fresh attestation
                _log.error("keyvault refused commit head %s@%d: %s", instance_id, sequence, exc.message)
                self._on_refused(instance_id, f"keyvault refused commit head {sequence}: {exc.message}")
                with self._cond:
                    self._paths.pop(instance_id, None)
                return "refused"
            self._metrics.record_head_advance(ok=True)
            self._settle(instance_id, advanced.confirmation.head.sequence)
            self._on_confirmed(advanced)
            return "ok"
        return "refused"

    def _lag_locked(self) -> int:
        return sum(seq - self._confirmed.get(iid, 0) for iid, seq in self._committed.items())
