"""The start-up sequence of one enclave incarnation: runner, attestation, keys, recovery.

`Startup.run()` builds a `Runtime` (everything that incarnation owns) step by step, reporting
each step in the lifecycle; see host.py for the steps and what FAILED means. The keyvault
being unreachable is retried with backoff here and said in the status detail.

Ownership (ownership.py): start-up recovers only the instances whose lease this host obtains;
those another live host owns are served there. While serving, the runtime's adopter takes over
instances whose owner stopped renewing (a host gone for good, paused, cut off): lease, key
release under the new fencing token, verify, replay, serve -- without leaving SERVING. An
instance whose lease is lost is dropped from this runtime at once; its held answers fail
(the client retries with the same request id, at the new owner).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state import lifecycle, recovery
from veil.services.state.attestation import Attestor
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost, EnclaveUnavailableError
from veil.services.state.errors import NotServing, RecoveryRefused
from veil.services.state.heads import Backoff, HeadAdvancer
from veil.services.state.holds import HeldAnswers
from veil.services.state.keys import KeyProvisioner, SealedCache
from veil.services.state.keyvault_client import KeyvaultClient, KeyvaultRefused, KeyvaultUnavailable
from veil.services.state.metrics import StateMetrics
from veil.services.state.ownership import LeaseHeld, Ownership, OwnershipConfig
from veil.services.state.store import InstanceRecord, StateStore
from veil.state.v1 import state_pb2

if TYPE_CHECKING:
    from veil.services.state.batcher import Batcher
    from veil.services.state.host import Command

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a serving host looks for instances whose owner stopped renewing its lease.
ADOPT_EVERY_S = 0.5
PROGRESS_EVERY_S = 2.0  # how often a long replay says how far it got (GetStatus, the log)
#: Entries a strict instance's enclave may go without a ConfirmHead while the keyvault's hold
#: keys release its answers: each batch leaves a hold in the enclave until then, and it refuses
#: batches at MAX_HOLDS (4,096) of them; a batch is at least one entry.
ENCLAVE_CONFIRM_EVERY = 1024


class Stopping(Exception):
    """The host is stopping; abandon start-up."""


@dataclass
class InstanceState:
    """A served instance: its configuration, committed head, latest snapshot position, and the
    descriptor the enclave signed for it (what clients verify), which it gives out only once the
    keyvault has registered the instance for this boot (None until then)."""

    config: envelope_pb2.InstanceConfig
    head: envelope_pb2.CommitHead
    snapshot_sequence: int
    descriptor: envelope_pb2.InstanceDescriptor | None = None
    #: The newest head this boot's enclave was handed the keyvault's confirmation of (ConfirmHead).
    enclave_confirmed: int = 0
    #: The newest confirmation not handed to the enclave (the keyvault's hold keys released what
    #: it covers); handed over once the advancer is idle, so the enclave forgets those holds.
    skipped: envelope_pb2.HeadConfirmation | None = None

    @property
    def strict(self) -> bool:
        """Whether the enclave holds this instance's answers until the keyvault confirms."""
        return self.config.acknowledgment != envelope_pb2.ACKNOWLEDGMENT_FAST


@dataclass
class Runtime:
    """What one enclave incarnation owns; replaced as a whole when the host recovers again."""

    enclave: EnclaveHost
    keys: envelope_pb2.EnclavePublicKeys
    mrenclave: bytes
    attestor: Attestor
    provisioner: KeyProvisioner
    advancer: HeadAdvancer
    instances: dict[str, InstanceState] = field(default_factory=dict)
    # Held from an ExecuteBatch ECALL until its commit, and by queries and snapshots: nobody
    # reads enclave state that is not yet durable.
    apply_lock: threading.Lock = field(default_factory=threading.Lock)
    create_lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: Batcher[Command, state_pb2.ExecuteResponse] | None = None
    broken: str | None = None  # set when the enclave got ahead of the database, or must not serve
    jwks: str = ""
    holds: HeldAnswers = field(default_factory=HeldAnswers)
    metrics: StateMetrics = field(default_factory=StateMetrics)
    closing: threading.Event = field(default_factory=threading.Event)
    adopter: threading.Thread | None = None
    unadoptable: set[str] = field(default_factory=set)  # refused at recovery: an operator's to see
    # Dropped from this boot (lease lost): the enclave still holds an old copy, which it never
    # replaces, so taking such an instance back needs a new enclave boot (recover_again).
    stale: set[str] = field(default_factory=set)
    recover_again: Callable[[str], None] = lambda _why: None

    def drop(self, instance_id: str, why: str) -> None:
        """Stop serving an instance another host owns now; answers still held never release."""
        with self.apply_lock:
            dropped = self.instances.pop(instance_id, None)
            self.stale.add(instance_id)
        if dropped is not None:
            _log.warning("no longer serving instance %r: %s", instance_id, why)
        self.holds.fail_instance(instance_id, NotServing.moved(instance_id))

    def close(self) -> None:
        self.closing.set()
        if self.adopter is not None and self.adopter is not threading.current_thread():
            self.adopter.join(10)
        if self.batcher is not None:
            self.batcher.stop(drain=False, timeout=10)
        # A clean stop pushes the last committed heads to the keyvault (briefly: it may be away);
        # their confirmations still release held answers while the enclave is open.
        self.advancer.stop(flush_s=0 if self.broken else 2.0)
        # Answers still held were never released by the enclave: they will not be now.
        self.holds.fail(NotServing("the state service is recovering; retry with the same request_id"))
        self.enclave.close()

    def reseal(self) -> None:
        """Refresh the sealed key cache; failing is not fatal (the keyvault releases them again)."""
        try:
            self.provisioner.reseal()
        except (EnclaveCallError, OSError) as exc:
            _log.warning("could not write the sealed key cache: %s", exc)


@dataclass(frozen=True)
class HostParts:
    """The collaborators a state host and its start-up share, wired once by `StateHost`."""

    config: StateConfig
    store: StateStore
    keyvault: KeyvaultClient
    lifecycle: lifecycle.Lifecycle
    metrics: StateMetrics
    backoff: Backoff
    stop: threading.Event


class Startup:
    """Runs the start-up steps for one incarnation."""

    def __init__(self, parts: HostParts, enclave_factory: Callable[[], EnclaveHost]) -> None:
        self.parts = parts
        self._enclave_factory = enclave_factory
        self._cache = SealedCache(parts.config.sealed_cache)
        self.booting: Runtime | None = None  # the incarnation being built (to retire it on failure)
        self.ownership = Ownership(parts.keyvault, OwnershipConfig.from_env(), stop=parts.stop)
        # Every advance and instance-key release carries this host's fencing token; a release
        # for an instance without one (a creation) takes the lease first.
        parts.keyvault.fencing = self.ownership.token
        parts.keyvault.fencing_for_release = self.ownership.token_or_acquire
        self.adopt_every_s = ADOPT_EVERY_S

    def _with_keyvault(self, step: lifecycle.Step, what: str, action: Callable[[], T]) -> T:
        """Run `action`, retrying with backoff while the keyvault is unreachable (said in status)."""
        attempt = 0
        while True:
            try:
                return action()
            except KeyvaultUnavailable as exc:
                attempt += 1
                delay = self.parts.backoff.delay(attempt)
                self.parts.lifecycle.set(step, f"{what}: {exc.message}; retry {attempt} in {delay:.1f}s")
                if self.parts.stop.wait(delay):
                    raise Stopping from None

    def run(
        self, on_refused: Callable[[Runtime, str], None], on_broken: Callable[[Runtime, str], None]
    ) -> Runtime:
        """Build a serving incarnation (its batcher is the host's to add); raises on failure."""
        config = self.parts.config
        self.parts.lifecycle.set(lifecycle.STARTING, f"starting the enclave runner ({config.enclave_mode})")
        enclave = self._enclave_factory()
        try:
            # The enclave pins the keyvault's release-signing key: it accepts keys from no other.
            self.parts.lifecycle.set(
                lifecycle.ATTESTING, f"asking the keyvault at {self.parts.keyvault.address} for its keys"
            )
            jwks = self._with_keyvault(
                lifecycle.ATTESTING, "reaching the keyvault", self.parts.keyvault.get_jwks
            )
            init = enclave.initialize(
                config.enclave_memory_mb * 1024 * 1024, keyvault_release_public_key=jwks.release_public_key
            )
        except BaseException:
            enclave.close()
            raise
        attestor = Attestor(enclave, self.parts.keyvault, init.keys)
        runtime = Runtime(
            metrics=self.parts.metrics,
            enclave=enclave,
            keys=init.keys,
            mrenclave=init.mrenclave,
            attestor=attestor,
            provisioner=KeyProvisioner(enclave, self.parts.keyvault, attestor, self._cache),
            advancer=HeadAdvancer(
                self.parts.keyvault,
                lambda fresh: (attestor.fresh() if fresh else attestor.current()).token,
                metrics=self.parts.metrics,
                on_refused=lambda iid, why: on_refused(runtime, f"instance {iid!r}: {why}"),
                on_confirmed=lambda advanced: _take(
                    runtime,
                    instance_id=advanced.confirmation.instance_id,
                    on_refused=on_refused,
                    on_broken=on_broken,
                    confirmation=advanced.confirmation,
                    hold_keys=list(advanced.hold_keys),
                    taken_over=self._taken_over,
                ),
                read_fence=lambda iid: self._read_fence(runtime, iid, on_refused, on_broken),
                on_idle=lambda: _hand_over_skipped(
                    runtime, on_refused=on_refused, on_broken=on_broken, taken_over=self._taken_over
                ),
                on_lost=self.ownership.lose,
                fencing=self.ownership.token,
                backoff=self.parts.backoff,
            ),
        )
        self.ownership.on_lost = runtime.drop
        runtime.recover_again = functools.partial(on_broken, runtime)
        runtime.jwks = jwks.jwks_json
        self.booting = runtime
        self.parts.lifecycle.set(
            lifecycle.ATTESTING, f"attesting at the keyvault at {self.parts.keyvault.address}"
        )
        self._with_keyvault(lifecycle.ATTESTING, "attesting at the keyvault", attestor.fresh)
        records = self._owned(self.parts.store.list_instances())
        # Renew from the moment the leases are taken: releasing keys and replaying long logs can
        # outlast a ttl, and a lease lapsed meanwhile drops its instance right after serving.
        self.ownership.start()
        self.parts.lifecycle.set(
            lifecycle.OBTAINING_KEYS, f"obtaining the data keys of {len(records)} instance(s)"
        )
        released = False
        unsealed = runtime.provisioner.unseal_cache() if records else set()
        for record in records:
            if record.instance_id not in unsealed:
                self._with_keyvault(
                    lifecycle.OBTAINING_KEYS,
                    f"releasing the key of {record.instance_id!r}",
                    functools.partial(runtime.provisioner.release, record.instance_id),
                )
                released = True
        for number, record in enumerate(records, 1):
            released |= self._recover(runtime, record, number, len(records))
        if released:
            runtime.reseal()
        runtime.adopter = threading.Thread(
            target=self._adopt_loop, args=(runtime,), name="adopter", daemon=True
        )
        runtime.adopter.start()
        return runtime

    def _owned(self, records: list[InstanceRecord]) -> list[InstanceRecord]:
        """The instances whose lease this host obtains (others are served by their owners). A
        lease this host holds already (a re-boot) is kept and renewed, not taken anew: a new
        token while the renewal thread renews the old one got that renewal refused, which
        dropped the new lease (re-boot loops, instances served without a lease)."""
        self.ownership.forget_all_but({record.instance_id for record in records})
        owned = []
        for record in records:
            iid = record.instance_id
            try:
                self._with_keyvault(
                    lifecycle.OBTAINING_KEYS,
                    f"taking the lease of {iid!r}",
                    functools.partial(self.ownership.keep, iid),
                )
            except LeaseHeld as exc:
                _log.info("not serving instance %r: %s", iid, exc)
                continue
            owned.append(record)
        return owned

    # -- taking over instances of hosts that are gone ---------------------------------------
    def _adopt_loop(self, runtime: Runtime) -> None:
        while not runtime.closing.wait(self.adopt_every_s) and not self.parts.stop.is_set():
            if runtime.broken is not None:
                return
            try:
                self.adopt_orphans(runtime)
            except Exception:  # the keyvault or the database away: next round
                _log.warning("taking over instances failed; retrying", exc_info=True)

    def adopt_orphans(self, runtime: Runtime) -> list[str]:
        """One round: take over every stored instance whose lease expired; returns their ids."""
        served = set(runtime.instances) | runtime.unadoptable
        candidates = [r for r in self.parts.store.list_instances() if r.instance_id not in served]
        if not candidates:
            return []
        now = time.time()
        ids = [record.instance_id for record in candidates]
        leases = {lease.instance_id: lease for lease in self.parts.keyvault.list_leases(ids)}
        adopted: list[str] = []
        for record in candidates:
            lease = leases.get(record.instance_id)
            if lease is not None and lease.expire_time.ToMicroseconds() / 1e6 > now:
                continue  # its owner renews it (the keyvault decides; this only saves calls)
            if record.instance_id in runtime.stale:
                # This enclave holds an old copy it will not replace: boot a new one, whose
                # start-up takes the expired lease like any other (its instances move on meanwhile).
                runtime.recover_again(
                    f"instance {record.instance_id!r} is orphaned and this enclave holds an old copy"
                )
                return adopted
            try:
                token = self.ownership.acquire(record.instance_id)
            except LeaseHeld:
                continue
            if self._adopt(runtime, record, token):
                adopted.append(record.instance_id)
        return adopted

    def _adopt(self, runtime: Runtime, record: InstanceRecord, token: int) -> bool:
        """Release the key under our token, verify and replay the log, serve the instance."""
        iid = record.instance_id
        started = time.monotonic()
        try:
            with runtime.create_lock, runtime.apply_lock:
                if runtime.closing.is_set() or runtime.broken is not None:
                    return False
                runtime.provisioner.release(iid)
                self._recover(runtime, record, 0, 0, quiet=True)
                if iid not in runtime.instances:  # its lease was lost meanwhile
                    return False
        except RecoveryRefused as exc:
            _log.error("instance %r cannot be taken over: %s", iid, exc.message)
            runtime.unadoptable.add(iid)
            self.ownership.lose(iid, token, exc.message)
            return False
        except LeaseHeld:
            return False
        except Exception as exc:
            # e.g. the keyvault refused the release (the lease moved again): give it back.
            _log.warning("taking over instance %r failed: %s", iid, exc)
            runtime.instances.pop(iid, None)
            self.ownership.lose(iid, token, f"take-over failed: {exc}")
            return False
        runtime.reseal()
        _log.info("took over instance %r in %.2fs", iid, time.monotonic() - started)
        return True

    def _read_fence(
        self,
        runtime: Runtime,
        instance_id: str,
        on_refused: Callable[[Runtime, str], None],
        on_broken: Callable[[Runtime, str], None],
    ) -> int:
        """A read fence: the keyvault's statement for a read challenge issued after the reads it
        covers; returns the read rounds still waiting for their heads (-1: refused)."""
        try:
            challenge = runtime.enclave.issue_challenge(instance_id, reads=True)
        except EnclaveUnavailableError as exc:
            on_broken(runtime, f"the enclave runner failed: {exc}")
            return -1
        remote = self.parts.keyvault.get_commit_head(instance_id, runtime.keys.signing_public_key, challenge)
        return _take(
            runtime,
            instance_id=instance_id,
            on_refused=on_refused,
            on_broken=on_broken,
            statement=remote.statement,
            taken_over=self._taken_over,
        )

    def _taken_over(self, instance_id: str, why: str) -> bool:
        """The enclave refused the keyvault's head of an instance: True when another host holds
        its lease now (it took the instance over while this one was paused or cut off, and moved
        its head on), after dropping that instance only, as an advance refused LEASE_LOST does.
        False while the lease is still this host's token, or the instance has none: a fork, or
        this boot left behind, and the caller stops serving. KeyvaultUnavailable: asked again
        (the next read fence or confirmation is refused the same way)."""
        token = self.ownership.token(instance_id)
        try:
            leases = self.parts.keyvault.list_leases([instance_id])
        except KeyvaultRefused as exc:
            _log.warning("instance %r: its lease could not be read: %s", instance_id, exc.message)
            return False
        # Fencing tokens grow with every acquisition: a newer one is another owner's.
        if not any(lease.instance_id == instance_id and lease.fencing_token > token for lease in leases):
            return False
        self.ownership.lose(instance_id, token, f"another host owns it now; {why}")
        return True

    def _recover(
        self, runtime: Runtime, record: InstanceRecord, number: int, total: int, *, quiet: bool = False
    ) -> bool:
        """Recover one instance; True when keys had to be released for it. `quiet`: a take-over
        while serving (no lifecycle step, no keyvault retries: the adopter's next round retries)."""
        iid = record.instance_id
        if not quiet:
            self.parts.lifecycle.set(lifecycle.RECOVERING, f"recovering instance {iid!r} ({number}/{total})")
        retrying = self._with_keyvault if not quiet else _at_once
        started = time.monotonic()
        log = recovery.read_log(iid, self.parts.store)
        said = started  # when progress was last said

        def progress(replayed: int) -> None:
            nonlocal said
            now = time.monotonic()
            if not quiet and now - said >= PROGRESS_EVERY_S:
                said = now
                self.parts.lifecycle.set(
                    lifecycle.RECOVERING,
                    f"recovering instance {iid!r} ({number}/{total}): "
                    f"{replayed:,} of {log.entry_count:,} entries replayed",
                )

        released, moves = False, 0
        while True:  # again after a key release (once) or a log that moved (twice at most)
            remote = retrying(
                lifecycle.RECOVERING,
                f"reading the commit head of {iid!r}",
                # For this enclave and a challenge it just issued: Restore takes nothing older.
                lambda: self.parts.keyvault.get_commit_head(
                    iid, runtime.keys.signing_public_key, runtime.enclave.issue_challenge(iid)
                ),
            )
            recovery.check_freshness(log, remote)
            try:
                restored = recovery.restore(
                    runtime.enclave, log, remote, now_ms=int(time.time() * 1000), progress=progress
                )
                break
            except recovery.LogMoved:
                moves += 1
                if moves > 2:
                    raise
                log = recovery.read_log(iid, self.parts.store)  # from the newer snapshot
            except recovery.MissingKey as missing:
                if released:
                    raise
                # Data encrypted under a key version the sealed cache did not hold (e.g. after rotation).
                retrying(
                    lifecycle.RECOVERING,
                    f"releasing older key versions of {iid!r}",
                    functools.partial(runtime.provisioner.release_versions, iid, missing.versions),
                )
                released = True
        head = restored.head
        if remote.sequence < head.sequence:
            _log.warning(
                "instance %r: database head %d is ahead of the keyvault head %d (the next commit catches up)",
                iid,
                head.sequence,
                remote.sequence,
            )
        self.parts.metrics.record_recovery(log.entry_count, time.monotonic() - started)
        state = InstanceState(
            config=envelope_pb2.InstanceConfig.FromString(record.config),
            head=head,
            snapshot_sequence=log.snapshot_sequence,
            descriptor=restored.descriptor if restored.HasField("descriptor") else None,
        )
        # Served only under a lease held: checked and set under the apply lock, which a loss
        # (`Runtime.drop`, after the token is forgotten) takes too, so none slips in between.
        # A take-over (`quiet`) holds that lock already.
        with contextlib.nullcontext() if quiet else runtime.apply_lock:
            if not self.ownership.token(iid):
                runtime.stale.add(iid)  # the enclave restored it: this boot cannot take it back
                _log.warning("not serving instance %r: its lease was lost during recovery", iid)
                return released
            runtime.instances[iid] = state
        runtime.advancer.confirm(iid, remote.sequence)
        runtime.advancer.note_durable(iid, head.sequence)
        if restored.HasField("link"):  # entries the keyvault has not seen: its head catches up now
            runtime.advancer.push(restored.link)
        return released


def _at_once(_step: lifecycle.Step, _what: str, action: Callable[[], T]) -> T:
    return action()


def _hand_over_skipped(
    runtime: Runtime,
    *,
    on_refused: Callable[[Runtime, str], None],
    on_broken: Callable[[Runtime, str], None],
    taken_over: Callable[[str, str], bool],
) -> None:
    """Hand the enclave each instance's newest skipped confirmation (the advancer is idle):
    the holds it covers were released by the keyvault's hold keys, and the enclave forgets them."""
    for instance_id, state in list(runtime.instances.items()):
        if state.skipped is not None:
            _take(
                runtime,
                instance_id=instance_id,
                on_refused=on_refused,
                on_broken=on_broken,
                confirmation=state.skipped,
                taken_over=taken_over,
            )


def _take(
    runtime: Runtime,
    *,
    instance_id: str,
    on_refused: Callable[[Runtime, str], None],
    on_broken: Callable[[Runtime, str], None],
    confirmation: envelope_pb2.HeadConfirmation | None = None,
    hold_keys: list[keyvault_pb2.HoldKey] | None = None,
    statement: envelope_pb2.HeadStatement | None = None,
    taken_over: Callable[[str, str], bool] = lambda _instance_id, _why: False,
) -> int:
    """Hand the keyvault's word on a head to the enclave and release what it frees; returns the
    read rounds still waiting (-1 when the enclave refused it: this incarnation stops, unless
    `taken_over(instance_id, why)` finds another host owns the instance now and drops it).

    A confirmation comes with the hold keys of its heads: when they release every answer it
    covers, the enclave is told only every `ENCLAVE_CONFIRM_EVERY` entries (so its holds stay
    few), not once per batch, and once the advancer is idle (`_hand_over_skipped`, which passes
    no `hold_keys`: the enclave is told then)."""
    state = runtime.instances.get(instance_id)
    if confirmation is not None and state is not None and state.descriptor is not None:
        if not state.strict and not runtime.holds.commands_waiting(instance_id):
            # Batches it ran before the keyvault registered it wait for their heads' confirmation
            # (from the enclave, which then forgets those holds).
            return 0  # a fast instance registered for this boot holds nothing more: no ECALL to spend
        if state.strict and hold_keys is not None:
            vouched = runtime.holds.release_vouched(instance_id, hold_keys, confirmation.head.sequence)
            runtime.metrics.record_holds_released(vouched.released, by_keyvault=True)
            if (
                vouched.settled
                and confirmation.head.sequence - state.enclave_confirmed < ENCLAVE_CONFIRM_EVERY
            ):
                state.skipped = confirmation
                return 0
    try:
        response = runtime.enclave.confirm_head(confirmation, statement=statement)
    except EnclaveCallError as exc:  # the keyvault holds another chain, or this boot was left behind
        why = f"instance {instance_id!r}: the enclave refused the keyvault's head: {exc.message}"
        if not taken_over(instance_id, why):
            on_refused(runtime, why)
        return -1
    except EnclaveUnavailableError as exc:
        on_broken(runtime, f"the enclave runner failed: {exc}")
        return -1
    if response.HasField("descriptor") and state is not None:
        state.descriptor = response.descriptor  # registered for this boot: before any waiter wakes
    if confirmation is not None and state is not None:
        state.enclave_confirmed = max(state.enclave_confirmed, confirmation.head.sequence)
        if state.skipped is not None and state.skipped.head.sequence <= state.enclave_confirmed:
            state.skipped = None
    released = runtime.holds.release(instance_id, list(response.released))
    runtime.metrics.record_holds_released(released, by_keyvault=False)
    return response.reads_waiting
