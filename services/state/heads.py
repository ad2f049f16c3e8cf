"""Advancing commit heads at the keyvault, in the background, coalesced, retried until caught up.

The rule (what an acknowledgement means):

* An Execute is acknowledged once its batch is **durably committed** to the database. The
  keyvault's commit head is advanced right after, asynchronously, by this thread: it is not on
  the acknowledgement path, so a slow or unreachable keyvault never stops the service.
* Advances are coalesced: only the newest enclave-signed head per instance is sent, so a
  keyvault that was away for a while is caught up with one call per instance. They are also
  paced (at most one round per `pace_s`, default 20 ms): under load every batch would otherwise
  cost the keyvault a token check, a signature check and a durable write (measured: a third of
  a core at 250 commits/s); paced, the heads of the batches committed meanwhile coalesce.
* While the keyvault is unreachable the head lags; the lag (entries committed but not yet
  covered by the keyvault head) is shown in GetStatus. An optional bound (VEIL_STATE_MAX_HEAD_LAG)
  makes the host refuse new commands (UNAVAILABLE) once an instance lags that far, which bounds
  how much acknowledged work a rollback of the database could hide.
* A refusal by the keyvault (after one retry with a fresh attestation) means it considers our
  log a fork or a rollback, or this enclave not allowed: the host stops serving (FAILED).

Recovery accepts a database head *ahead* of the keyvault head exactly when the keyvault head
is on the stored chain and every entry after it chains and authenticates in the enclave (see
recovery.py): that is the lag of a crash between commit and advance. It is caught up by the
next commit's signed head (a restored enclave has no signed head to send until then).

What this does not do: the host is outside the TCB. A malicious host can withhold advances and
later roll its database back to anywhere at or after the keyvault head; only the entries the
keyvault head covers are rollback-protected. The lag bound is this host's discipline, not a
TCB guarantee. Strict protection would acknowledge only after the advance (one keyvault round
trip per batch, and no service while the keyvault is away): the trade-off chosen here is
availability, with the window kept to one pace interval and one advance in normal operation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from veil.enclave.v1 import envelope_pb2

from services.state.keyvault_client import KeyvaultClient, KeyvaultRefused, KeyvaultUnavailable
from services.state.metrics import StateMetrics

_log = logging.getLogger(__name__)

ADVANCE_PACE_S = 0.02


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between retries."""

    initial_s: float = 0.2
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1)))


class HeadAdvancer:
    """One background thread pushing the newest committed head of each instance to the keyvault."""

    def __init__(
        self,
        keyvault: KeyvaultClient,
        token: Callable[[bool], str],
        *,
        metrics: StateMetrics,
        on_refused: Callable[[str, str], None],
        backoff: Backoff | None = None,
        pace_s: float = ADVANCE_PACE_S,
    ) -> None:
        """`token(fresh)` returns an attestation token (a new one when `fresh`)."""
        self._keyvault = keyvault
        self._pace_s = pace_s
        self._token = token
        self._metrics = metrics
        self._on_refused = on_refused
        self._backoff = backoff or Backoff()
        self._cond = threading.Condition()
        self._pending: dict[str, envelope_pb2.SignedCommitHead] = {}
        self._confirmed: dict[str, int] = {}
        self._committed: dict[str, int] = {}
        self._problem: str | None = None
        self._busy = False  # heads taken from `_pending` and not yet settled
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="head-advancer", daemon=True)

    # -- inputs ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0, *, flush_s: float = 0.0) -> None:
        """Stop the thread, first giving pending heads up to `flush_s` to reach the keyvault."""
        with self._cond:
            if flush_s > 0:
                self._cond.wait_for(lambda: not self._pending and not self._busy, flush_s)
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def confirm(self, instance_id: str, sequence: int) -> None:
        """Record a head the keyvault is known to hold (from recovery)."""
        with self._cond:
            self._confirmed[instance_id] = max(self._confirmed.get(instance_id, 0), sequence)
            self._committed[instance_id] = max(self._committed.get(instance_id, 0), sequence)

    def committed(self, head: envelope_pb2.SignedCommitHead) -> None:
        """A signed head whose entries are durably committed; it replaces any older pending one."""
        with self._cond:
            instance_id = head.instance_id
            sequence = head.head.sequence
            self._committed[instance_id] = max(self._committed.get(instance_id, 0), sequence)
            pending = self._pending.get(instance_id)
            if pending is None or pending.head.sequence < sequence:
                self._pending[instance_id] = head
                self._cond.notify_all()

    def note_durable(self, instance_id: str, sequence: int) -> None:
        """Entries up to `sequence` are in the database even though no signed head covers them yet."""
        with self._cond:
            self._committed[instance_id] = max(self._committed.get(instance_id, 0), sequence)

    # -- outputs -----------------------------------------------------------------------------
    def confirmed(self, instance_id: str) -> int:
        """The highest sequence the keyvault holds for the instance (as far as we know)."""
        with self._cond:
            return self._confirmed.get(instance_id, 0)

    def lag(self, instance_id: str) -> int:
        """Committed entries not yet covered by the keyvault head."""
        with self._cond:
            return self._committed.get(instance_id, 0) - self._confirmed.get(instance_id, 0)

    def total_lag(self) -> int:
        with self._cond:
            return sum(seq - self._confirmed.get(iid, 0) for iid, seq in self._committed.items())

    def problem(self) -> str | None:
        """Why heads are not advancing right now (e.g. the keyvault is unreachable), or None."""
        with self._cond:
            return self._problem

    # -- the thread ----------------------------------------------------------------------------
    def _next(self) -> list[envelope_pb2.SignedCommitHead] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or bool(self._pending))
            if self._stopping:
                return None
            heads = list(self._pending.values())
            self._pending.clear()
            self._busy = True
            return heads

    def _requeue(self, head: envelope_pb2.SignedCommitHead) -> None:
        with self._cond:
            newer = self._pending.get(head.instance_id)
            if newer is None or newer.head.sequence < head.head.sequence:
                self._pending[head.instance_id] = head

    def _run(self) -> None:
        failures = 0
        while True:
            heads = self._next()
            if heads is None:
                return
            unreachable = False
            for head in heads:
                try:
                    outcome = self._advance(head)
                except Exception as exc:  # e.g. re-attesting failed in the enclave: retry later
                    _log.warning(
                        "commit head %s@%d not advanced: %s", head.instance_id, head.head.sequence, exc
                    )
                    outcome = "unreachable"
                if outcome == "unreachable":
                    unreachable = True
                    self._requeue(head)
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            if not unreachable:
                failures = 0
                with self._cond:  # pace the keyvault; stop() still wakes us
                    self._cond.wait_for(lambda: self._stopping, self._pace_s)
                continue
            failures += 1
            with self._cond:
                # Sleep, but wake for stop(); new heads just coalesce meanwhile.
                self._cond.wait_for(lambda: self._stopping, self._backoff.delay(failures))

    def _advance(self, head: envelope_pb2.SignedCommitHead) -> str:
        instance_id, sequence = head.instance_id, head.head.sequence
        for fresh in (False, True):
            try:
                stored = self._keyvault.advance_commit_head(head, self._token(fresh))
            except KeyvaultUnavailable as exc:
                self._metrics.record_head_advance(ok=False)
                with self._cond:
                    self._problem = f"{exc.message}; commit heads lag by {self._lag_locked()} entries"
                return "unreachable"
            except KeyvaultRefused as exc:
                self._metrics.record_head_advance(ok=False)
                if not fresh:
                    continue  # maybe an expired token: once more with a fresh attestation
                _log.error("keyvault refused commit head %s@%d: %s", instance_id, sequence, exc.message)
                self._on_refused(instance_id, f"keyvault refused commit head {sequence}: {exc.message}")
                return "refused"
            self._metrics.record_head_advance(ok=True)
            with self._cond:
                self._confirmed[instance_id] = max(self._confirmed.get(instance_id, 0), stored, sequence)
                self._problem = None
                self._cond.notify_all()
            return "ok"
        return "refused"

    def _lag_locked(self) -> int:
        return sum(seq - self._confirmed.get(iid, 0) for iid, seq in self._committed.items())
