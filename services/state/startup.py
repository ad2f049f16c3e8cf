"""The start-up sequence of one enclave incarnation: runner, attestation, keys, recovery.

`Startup.run()` builds a `Runtime` (everything that incarnation owns) step by step, reporting
each step in the lifecycle; see host.py for the steps and what FAILED means. The keyvault
being unreachable is retried with backoff here and said in the status detail.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from veil.enclave.v1 import envelope_pb2
from veil.services.state import lifecycle, recovery
from veil.services.state.attestation import Attestor
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost, EnclaveUnavailableError
from veil.services.state.errors import NotServing
from veil.services.state.heads import Backoff, HeadAdvancer
from veil.services.state.holds import HeldAnswers
from veil.services.state.keys import KeyProvisioner, SealedCache
from veil.services.state.keyvault_client import KeyvaultClient, KeyvaultUnavailable
from veil.services.state.metrics import StateMetrics
from veil.services.state.store import InstanceRecord, StateStore
from veil.state.v1 import state_pb2

if TYPE_CHECKING:
    from veil.services.state.batcher import Batcher
    from veil.services.state.host import Command

_log = logging.getLogger(__name__)

T = TypeVar("T")


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

    def close(self) -> None:
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


class Startup:
    """Runs the start-up steps for one incarnation."""

    def __init__(
        self,
        config: StateConfig,
        *,
        store: StateStore,
        keyvault: KeyvaultClient,
        enclave_factory: Callable[[], EnclaveHost],
        steps: lifecycle.Lifecycle,
        metrics: StateMetrics,
        backoff: Backoff,
        stop: threading.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.keyvault = keyvault
        self._enclave_factory = enclave_factory
        self.lifecycle = steps
        self.metrics = metrics
        self._backoff = backoff
        self._stop = stop
        self._cache = SealedCache(config.sealed_cache)
        self.booting: Runtime | None = None  # the incarnation being built (to retire it on failure)

    def _with_keyvault(self, step: lifecycle.Step, what: str, action: Callable[[], T]) -> T:
        """Run `action`, retrying with backoff while the keyvault is unreachable (said in status)."""
        attempt = 0
        while True:
            try:
                return action()
            except KeyvaultUnavailable as exc:
                attempt += 1
                delay = self._backoff.delay(attempt)
                self.lifecycle.set(step, f"{what}: {exc.message}; retry {attempt} in {delay:.1f}s")
                if self._stop.wait(delay):
                    raise Stopping from None

    def run(
        self, on_refused: Callable[[Runtime, str], None], on_broken: Callable[[Runtime, str], None]
    ) -> Runtime:
        """Build a serving incarnation (its batcher is the host's to add); raises on failure."""
        config = self.config
        self.lifecycle.set(lifecycle.STARTING, f"starting the enclave runner ({config.enclave_mode})")
        enclave = self._enclave_factory()
        try:
            # The enclave pins the keyvault's release-signing key: it accepts keys from no other.
            self.lifecycle.set(
                lifecycle.ATTESTING, f"asking the keyvault at {self.keyvault.address} for its keys"
            )
            jwks = self._with_keyvault(lifecycle.ATTESTING, "reaching the keyvault", self.keyvault.get_jwks)
            init = enclave.initialize(
                config.enclave_memory_mb * 1024 * 1024, keyvault_release_public_key=jwks.release_public_key
            )
        except BaseException:
            enclave.close()
            raise
        attestor = Attestor(enclave, self.keyvault, init.keys)
        runtime = Runtime(
            enclave=enclave,
            keys=init.keys,
            mrenclave=init.mrenclave,
            attestor=attestor,
            provisioner=KeyProvisioner(enclave, self.keyvault, attestor, self._cache),
            advancer=HeadAdvancer(
                self.keyvault,
                lambda fresh: (attestor.fresh() if fresh else attestor.current()).token,
                metrics=self.metrics,
                on_refused=lambda iid, why: on_refused(runtime, f"instance {iid!r}: {why}"),
                on_confirmed=lambda confirmation: _take(
                    runtime,
                    instance_id=confirmation.instance_id,
                    on_refused=on_refused,
                    on_broken=on_broken,
                    confirmation=confirmation,
                ),
                read_fence=lambda iid: self._read_fence(runtime, iid, on_refused, on_broken),
                backoff=self._backoff,
            ),
        )
        runtime.jwks = jwks.jwks_json
        self.booting = runtime
        self.lifecycle.set(lifecycle.ATTESTING, f"attesting at the keyvault at {self.keyvault.address}")
        self._with_keyvault(lifecycle.ATTESTING, "attesting at the keyvault", attestor.fresh)
        records = self.store.list_instances()
        self.lifecycle.set(lifecycle.OBTAINING_KEYS, f"obtaining the data keys of {len(records)} instance(s)")
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
        return runtime

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
        remote = self.keyvault.get_commit_head(instance_id, runtime.keys.signing_public_key, challenge)
        return _take(
            runtime,
            instance_id=instance_id,
            on_refused=on_refused,
            on_broken=on_broken,
            statement=remote.statement,
        )

    def _recover(self, runtime: Runtime, record: InstanceRecord, number: int, total: int) -> bool:
        """Recover one instance; True when keys had to be released for it."""
        iid = record.instance_id
        self.lifecycle.set(lifecycle.RECOVERING, f"recovering instance {iid!r} ({number}/{total})")
        started = time.monotonic()
        log = recovery.verify_chain(iid, self.store.load(iid))
        released = False
        for attempt in (1, 2):
            remote = self._with_keyvault(
                lifecycle.RECOVERING,
                f"reading the commit head of {iid!r}",
                # For this enclave and a challenge it just issued: Restore takes nothing older.
                lambda: self.keyvault.get_commit_head(
                    iid, runtime.keys.signing_public_key, runtime.enclave.issue_challenge(iid)
                ),
            )
            recovery.check_freshness(log, remote, self.store)
            try:
                restored = recovery.restore(
                    runtime.enclave, log, remote, self.store, now_ms=int(time.time() * 1000)
                )
                break
            except recovery.MissingKey:
                if attempt == 2:
                    raise
                # Data encrypted under a key version the sealed cache did not hold (e.g. after rotation).
                self._with_keyvault(
                    lifecycle.RECOVERING,
                    f"releasing older key versions of {iid!r}",
                    lambda: runtime.provisioner.release_versions(iid, log.key_versions),
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
        self.metrics.record_recovery(len(log.entries), time.monotonic() - started)
        runtime.instances[iid] = InstanceState(
            config=envelope_pb2.InstanceConfig.FromString(record.config),
            head=head,
            snapshot_sequence=log.snapshot_sequence,
            descriptor=restored.descriptor if restored.HasField("descriptor") else None,
        )
        runtime.advancer.confirm(iid, remote.sequence)
        runtime.advancer.note_durable(iid, head.sequence)
        if restored.HasField("link"):  # entries the keyvault has not seen: its head catches up now
            runtime.advancer.push(restored.link)
        return released


def _take(
    runtime: Runtime,
    *,
    instance_id: str,
    on_refused: Callable[[Runtime, str], None],
    on_broken: Callable[[Runtime, str], None],
    confirmation: envelope_pb2.HeadConfirmation | None = None,
    statement: envelope_pb2.HeadStatement | None = None,
) -> int:
    """Hand the keyvault's word on a head to the enclave and release what it frees; returns the
    read rounds still waiting (-1 when the enclave refused it: this incarnation stops)."""
    state = runtime.instances.get(instance_id)
    if confirmation is not None and state is not None and not state.strict and state.descriptor is not None:
        return 0  # a fast instance registered for this boot holds nothing: no ECALL to spend
    try:
        response = runtime.enclave.confirm_head(confirmation, statement=statement)
    except EnclaveCallError as exc:  # the keyvault holds another chain, or this boot was left behind
        on_refused(
            runtime, f"instance {instance_id!r}: the enclave refused the keyvault's head: {exc.message}"
        )
        return -1
    except EnclaveUnavailableError as exc:
        on_broken(runtime, f"the enclave runner failed: {exc}")
        return -1
    if response.HasField("descriptor") and state is not None:
        state.descriptor = response.descriptor  # registered for this boot: before any waiter wakes
    runtime.holds.release(instance_id, list(response.released))
    return response.reads_waiting
