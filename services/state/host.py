"""The state host: runs the enclave, recovers it at start-up, and serves commands through it.

Start-up (a background thread, so GetStatus and health answer throughout):

    STARTING        start the enclave runner
    ATTESTING       read the keyvault's release-signing key; Initialize the enclave with it
                    pinned (and the memory budget); quote over SHA-256(public keys || nonce);
                    Attest at the keyvault -> token
    OBTAINING_KEYS  unseal the sealed key cache; release from the keyvault what it lacks
    RECOVERING      per instance: read the log, check the keyvault's commit head, Restore
    SERVING         health SERVING; commands flow
    FAILED          refused to serve (rollback, broken chain, tampering, refused head...);
                    the detail names the instance and the sequence. No crash loop: the
                    replica stays up, NOT_SERVING, saying why, until an operator acts.

A keyvault that is unreachable at start-up is retried with backoff, and the status detail says
so. Once SERVING, the keyvault is needed only to create instances and to advance commit heads
(heads.py), so the host keeps serving with the keys it holds while the keyvault is away.

One command: Execute -> (idempotency check) -> batcher -> ExecuteBatch ECALL (one per instance
in the batch) -> append_batch (entries + idempotency records, ONE durable transaction) ->
the batch's commit link goes to the head advancer -> futures completed (the acknowledgement).
For a strict instance (the default) the enclave's answers are held: they complete only once
the keyvault confirmed the batch's head and the enclave released them (holds.py), and their
idempotency records are written then.
If the enclave runner dies or a commit fails after the enclave moved on, the enclave is ahead
of the database: the host stops taking commands and reruns the start-up recovery in-process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from veil.services.common.instance_ids import INSTANCE_ID_RULE, is_instance_id
from veil.services.state import lifecycle
from veil.services.state.attestation import Attestation
from veil.services.state.batcher import Batcher, BatchLimits
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost, EnclaveUnavailableError
from veil.services.state.errors import (
    NotServing,
    RecoveryRefused,
    SequenceConflict,
    StoreError,
    from_ecall,
    from_outcome_error,
)
from veil.services.state.heads import Backoff
from veil.services.state.holds import unwrap, unwrap_read
from veil.services.state.keyvault_client import KeyvaultClient, KeyvaultUnavailable
from veil.services.state.metrics import StateMetrics
from veil.services.state.snapshots import take_snapshot
from veil.services.state.startup import HostParts, InstanceState, Runtime, Startup, Stopping
from veil.services.state.store import IdempotencyRecord, InstanceRecord, StateStore, StoredEntry
from veil.state.v1 import state_pb2

_log = logging.getLogger(__name__)

EnclaveFactory = Callable[[], EnclaveHost]

MAX_REQUEST_ID = 128
RESPONSE_TTL_S = 24 * 3600  # how long a request id keeps its first answer
PRUNE_EVERY_S = 3600.0
_COMMIT_ATTEMPTS = 3
_NOT_DURABLE = "the batch could not be made durable; the service is recovering"


@dataclass(frozen=True)
class Command:
    """One queued Execute."""

    instance_id: str
    request_id: str
    command: envelope_pb2.SealedCommand


@dataclass
class _BatchOutput:
    """What one batch must commit, over all its instances."""

    entries: list[StoredEntry] = field(default_factory=list)
    records: list[IdempotencyRecord] = field(default_factory=list)
    links: list[envelope_pb2.CommitLink] = field(default_factory=list)
    hold_key_versions: dict[str, int] = field(default_factory=dict)  # by instance


Answer = state_pb2.ExecuteResponse | BaseException | concurrent.futures.Future[state_pb2.ExecuteResponse]


def not_committed_in_time() -> DeadlineExceeded:
    """The error of a command whose deadline passed before its commit (it may still commit)."""
    return DeadlineExceeded(
        "the command was not committed within the deadline; retry with the same request_id"
    )


class StateHost:
    """The enclave host behind the StateService RPCs."""

    def __init__(
        self,
        config: StateConfig,
        *,
        store: StateStore,
        keyvault: KeyvaultClient,
        enclave_factory: EnclaveFactory,
        metrics: StateMetrics | None = None,
        on_serving: Callable[[bool], None] | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.parts = HostParts(
            config,
            store,
            keyvault,
            lifecycle=lifecycle.Lifecycle(on_serving),
            metrics=metrics or StateMetrics(),
            backoff=backoff or Backoff(initial_s=0.2, max_s=5.0),
            stop=threading.Event(),
        )
        # What callers watch: the start-up steps (as GetStatus reports them) and the counters.
        self.lifecycle = self.parts.lifecycle
        self.metrics = self.parts.metrics
        self._clock = clock
        self._startup = Startup(self.parts, enclave_factory)
        self._runtime: Runtime | None = None
        self._wake = threading.Event()
        self._reboot_reason: str | None = None
        self._failure: str | None = None
        self._state_lock = threading.Lock()
        self._inflight: dict[tuple[str, str], concurrent.futures.Future[state_pb2.ExecuteResponse]] = {}
        self._inflight_lock = threading.Lock()
        self._ecalls_before = 0
        self._pruned_at = clock()
        self._thread = threading.Thread(target=self._supervise, name="state-host", daemon=True)

    # == lifecycle ============================================================================
    def start(self) -> None:
        """Begin start-up in the background; watch `lifecycle` (or GetStatus) for progress."""
        self._thread.start()

    def stop(self) -> None:
        """Drain queued commands, stop the background threads and the enclave runner."""
        self.lifecycle.set(lifecycle.DRAINING, "shutting down")
        self.parts.stop.set()
        self._wake.set()
        self._thread.join(30)

    def queue_depth(self) -> int:
        """Commands waiting for the batcher (0 while not serving)."""
        runtime = self._runtime
        batcher = runtime.batcher if runtime is not None else None
        return batcher.queued if batcher is not None else 0

    def head_lag(self) -> int:
        """Committed entries the keyvault's commit heads do not cover yet (0 while not serving)."""
        runtime = self._runtime
        return runtime.advancer.total_lag() if runtime is not None else 0

    def wait_until(self, steps: set[lifecycle.Step], timeout: float) -> lifecycle.Step | None:
        """Block until the lifecycle reaches one of `steps` (tests, `veil up`-style waits)."""
        return self.lifecycle.wait_for(steps, timeout)

    def _supervise(self) -> None:
        attempt = 0
        while not self.parts.stop.is_set():
            started = time.monotonic()
            try:
                runtime = self._boot()
            except Stopping:
                break
            except StoreError as exc:
                # The database is away (e.g. PostgreSQL restarting): start over after a pause.
                self._retire_booting()
                attempt += 1
                delay = self.parts.backoff.delay(attempt)
                step = self.lifecycle.step
                self.lifecycle.set(
                    step, f"the database is unavailable ({exc.message}); retry {attempt} in {delay:.1f}s"
                )
                if self.parts.stop.wait(delay):
                    break
                continue
            except RecoveryRefused as exc:
                self._fail(exc.message)
                break
            except Exception as exc:
                _log.exception("start-up failed")
                self._fail(f"start-up failed: {type(exc).__name__}: {exc}")
                break
            attempt = 0
            with self._state_lock:
                self._runtime = runtime
                self._reboot_reason = None
            self.metrics.record_start_up(time.monotonic() - started)
            self.lifecycle.set(lifecycle.SERVING, f"serving {len(runtime.instances)} instance(s)")
            self._wake.wait()
            self._wake.clear()
            with self._state_lock:
                self._runtime = None
                reason, failure = self._reboot_reason, self._failure
            self._retire(runtime)
            if failure is not None or self.parts.stop.is_set():
                break
            self.lifecycle.set(lifecycle.RECOVERING, f"recovering again: {reason}")
        self._shutdown()

    def _boot(self) -> Runtime:
        runtime = self._startup.run(self._refuse_to_serve, self._request_recovery)
        runtime.batcher = Batcher(
            lambda batch: self._process(runtime, batch),
            limits=BatchLimits(
                max_batch=self.parts.config.batch_max, max_linger_s=self.parts.config.batch_linger_ms / 1000
            ),
            metrics=self.metrics,
            name="state-batcher",
            after_batch=lambda: self._housekeeping(runtime),
        )
        runtime.advancer.start()
        runtime.batcher.start()
        self._startup.booting = None
        return runtime

    def _retire_booting(self) -> None:
        booting, self._startup.booting = self._startup.booting, None
        if booting is not None:
            self._retire(booting)

    def _shutdown(self) -> None:
        self._retire_booting()
        if self._failure is None:
            self.lifecycle.set(lifecycle.DRAINING, "stopped")

    def _retire(self, runtime: Runtime) -> None:
        if runtime.batcher is not None:
            # Drain on shutdown (each command finishes or fails cleanly); fail fast on a broken enclave.
            runtime.batcher.stop(drain=runtime.broken is None, timeout=30)
            runtime.batcher = None
        self._ecalls_before += runtime.enclave.ecalls
        try:
            runtime.close()
        except Exception:
            _log.exception("closing the enclave failed")

    def _fail(self, detail: str) -> None:
        with self._state_lock:
            self._failure = detail
        self.lifecycle.set(lifecycle.FAILED, detail)

    def _request_recovery(self, runtime: Runtime, reason: str) -> None:
        """The enclave is ahead of the database or gone: stop taking commands, recover again."""
        runtime.broken = reason
        with self._state_lock:
            if self._runtime is runtime and self._reboot_reason is None:
                self._reboot_reason = reason
                self.lifecycle.set(lifecycle.RECOVERING, f"recovering again: {reason}")
        self._wake.set()

    def _refuse_to_serve(self, runtime: Runtime, detail: str) -> None:
        """The keyvault refused a commit head: this replica must not acknowledge anything more."""
        runtime.broken = detail
        self._fail(detail)
        self._wake.set()

    # == serving ==============================================================================
    def _serving(self) -> Runtime:
        with self._state_lock:
            runtime = self._runtime
        if runtime is None or runtime.broken is not None:
            step, detail = self.lifecycle.current()
            raise NotServing(f"the state service is {lifecycle.step_name(step)}: {detail}")
        return runtime

    def _instance(self, runtime: Runtime, instance_id: str) -> InstanceState:
        if not is_instance_id(instance_id):
            # Checked before echoing it: an unbounded id in the message and ErrorInfo overflowed
            # gRPC's 16 KiB metadata limit, so the caller saw RESOURCE_EXHAUSTED without ErrorInfo.
            raise InvalidArgument(INSTANCE_ID_RULE)
        state = runtime.instances.get(instance_id)
        if state is None and instance_id in self._startup.ownership.owned():
            # Its lease is ours but its replay has not finished (a take-over): retry, not absent.
            raise Unavailable(
                f"instance {instance_id!r} is being taken over by this replica; retry",
                reason="INSTANCE_TAKING_OVER",
            )
        if state is None:
            raise NotFound(
                f"no instance {instance_id!r} on this replica", metadata={"instance_id": instance_id}
            )
        return state

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def execute(
        self, instance_id: str, command: envelope_pb2.SealedCommand, request_id: str, timeout: float
    ) -> state_pb2.ExecuteResponse:
        """Run one sealed command; returns once its log entry is durably committed."""
        return self.wait_for(self.enqueue(instance_id, command, request_id), timeout)

    @staticmethod
    def wait_for(
        answer: state_pb2.ExecuteResponse | concurrent.futures.Future[state_pb2.ExecuteResponse],
        timeout: float,
    ) -> state_pb2.ExecuteResponse:
        """The answer `enqueue` promised, once committed, or DEADLINE_EXCEEDED after `timeout`."""
        if isinstance(answer, state_pb2.ExecuteResponse):
            return answer
        try:
            return answer.result(timeout)
        except concurrent.futures.TimeoutError:
            raise not_committed_in_time() from None

    def enqueue(
        self, instance_id: str, command: envelope_pb2.SealedCommand, request_id: str
    ) -> state_pb2.ExecuteResponse | concurrent.futures.Future[state_pb2.ExecuteResponse]:
        """Check and queue one sealed command without waiting: its stored answer (a repeated
        request id) or the future of its commit (see `wait_for`)."""
        runtime = self._serving()
        self._instance(runtime, instance_id)
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is at most {MAX_REQUEST_ID} characters")
        lag_bound = self.parts.config.max_head_lag
        if lag_bound and runtime.advancer.lag(instance_id) >= lag_bound:
            raise Unavailable(
                f"instance {instance_id!r}: the keyvault commit head lags by {lag_bound} entries or more "
                f"({runtime.advancer.problem() or 'advancing'}); refusing new commands until it catches up",
                reason="COMMIT_HEAD_LAG",
            )
        return self._submit(runtime, Command(instance_id, request_id, command))

    def _submit(
        self, runtime: Runtime, item: Command
    ) -> state_pb2.ExecuteResponse | concurrent.futures.Future[state_pb2.ExecuteResponse]:
        assert runtime.batcher is not None
        if not item.request_id:
            return runtime.batcher.submit(item)
        key = (item.instance_id, item.request_id)
        # In flight here? Committed before? (A future leaves `_inflight` only after its commit,
        # so checking in this order cannot miss a first attempt.) Otherwise submit it once.
        with self._inflight_lock:
            future = self._inflight.get(key)
        if future is not None:
            return future
        stored = self.parts.store.get_response(item.instance_id, item.request_id)
        if stored is not None:
            return state_pb2.ExecuteResponse.FromString(stored)
        with self._inflight_lock:
            future = self._inflight.get(key)
            submitted = future is None
            if future is None:
                future = runtime.batcher.submit(item)
                self._inflight[key] = future
        if submitted:  # outside the lock: a future already done runs the callback right here
            future.add_done_callback(lambda done: self._forget(key, done))
        return future

    def _forget(
        self, key: tuple[str, str], future: concurrent.futures.Future[state_pb2.ExecuteResponse]
    ) -> None:
        with self._inflight_lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _process(self, runtime: Runtime, batch: Sequence[Command]) -> list[Answer]:
        """The batcher's process function: ECALL per instance, one commit, links, then answers."""
        if runtime.broken is not None:
            return [NotServing(f"the state service is recovering: {runtime.broken}")] * len(batch)
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(batch):
            groups.setdefault(item.instance_id, []).append(index)
        results: list[Answer] = [Unavailable("not executed")] * len(batch)
        batch_out = _BatchOutput()
        now_ms = self._now_ms()
        with runtime.apply_lock:
            for instance_id, indexes in groups.items():
                if instance_id not in runtime.instances:  # dropped (lease lost) since it was queued
                    answers: list[Answer] = [NotServing.moved(instance_id)] * len(indexes)
                else:
                    answers = self._execute_group(
                        runtime, instance_id, [batch[i] for i in indexes], now_ms, batch_out
                    )
                for i, answer in zip(indexes, answers, strict=True):
                    results[i] = answer
            if batch_out.entries or batch_out.records:
                self._commit(runtime, batch_out.entries, batch_out.records)
            for link in batch_out.links:
                runtime.instances[link.instance_id].head = link.head
        # Durable now: the keyvault may learn of it (held answers wait for its confirmation).
        for link in batch_out.links:
            runtime.advancer.push(link, batch_out.hold_key_versions.get(link.instance_id, 0))
        return results

    def _execute_group(
        self, runtime: Runtime, instance_id: str, items: list[Command], now_ms: int, out: _BatchOutput
    ) -> list[Answer]:
        """One ExecuteBatch ECALL for one instance's commands; collects what must be committed."""
        started = time.monotonic()
        try:
            response = runtime.enclave.execute_batch(instance_id, [item.command for item in items], now_ms)
        except EnclaveCallError as exc:
            return [from_ecall(exc.code, exc.message, method="ExecuteBatch")] * len(items)
        except EnclaveUnavailableError as exc:
            self._request_recovery(runtime, f"the enclave runner failed: {exc}")
            raise NotServing("the enclave runner failed; recovering") from exc
        self.metrics.record_execute_ecall(time.monotonic() - started)
        if len(response.outcomes) != len(items):
            self._request_recovery(runtime, "the enclave answered a batch with the wrong outcome count")
            raise NotServing("the enclave misbehaved; recovering")
        answers: list[Answer] = []
        held: list[
            tuple[concurrent.futures.Future[state_pb2.ExecuteResponse], Command, state_pb2.ExecuteResponse]
        ]
        held = []
        for item, outcome in zip(items, response.outcomes, strict=True):
            if outcome.HasField("error"):
                # Not executed (unopenable, or over the memory budget): the code goes out as is.
                answers.append(from_outcome_error(outcome.error.code, outcome.error.message))
                continue
            answer = state_pb2.ExecuteResponse(outcome=outcome)
            if response.held_until or response.read_round:
                future: concurrent.futures.Future[state_pb2.ExecuteResponse] = concurrent.futures.Future()
                answers.append(future)
                held.append((future, item, answer))
                continue
            answers.append(answer)
            if outcome.accepted and item.request_id:
                out.records.append(_record(instance_id, item, answer, now_ms))
        out.entries.extend(StoredEntry.of(entry) for entry in response.entries)
        if response.entries:
            out.links.append(response.link)
        if held:
            opener: Callable[[bytes, str, int, envelope_pb2.CommandOutcome], None]
            if response.held_until:
                runtime.holds.expect(instance_id, response.held_until, response.held_key_check)
                out.hold_key_versions[instance_id] = response.held_key_version
                key = runtime.holds.key(instance_id, response.held_until)
                opener, number = unwrap, response.held_until
            else:  # refusals that read the account's counter state wait for a read fence
                runtime.advancer.request_read(instance_id)
                key = runtime.holds.read_key(instance_id, response.read_round)
                opener, number = unwrap_read, response.read_round
            key.add_done_callback(
                functools.partial(self._release_held, instance_id, opener, held, now_ms, number=number)
            )
        return answers

    def _release_held(
        self,
        instance_id: str,
        opener: Callable[[bytes, str, int, envelope_pb2.CommandOutcome], None],
        held: list[
            tuple[concurrent.futures.Future[state_pb2.ExecuteResponse], Command, state_pb2.ExecuteResponse]
        ],
        now_ms: int,
        key: concurrent.futures.Future[bytes],
        *,
        number: int,
    ) -> None:
        """The keyvault vouched for what the answers read: open them, record them, answer."""
        error = key.exception()
        if error is None:
            records = []
            try:
                for _, item, answer in held:
                    opener(key.result(), instance_id, number, answer.outcome)
                    if answer.outcome.accepted and item.request_id:
                        records.append(_record(instance_id, item, answer, now_ms))
            except DecryptionError:
                error = NotServing(
                    "a held answer did not open under its released key; the service is recovering"
                )
            else:
                try:  # a retry with the same request id gets this answer from now on
                    self.parts.store.append_batch([], records)
                except StoreError as exc:
                    _log.warning("idempotency records of %s@%d not stored: %s", instance_id, number, exc)
        for future, _, answer in held:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(answer)

    def _commit(self, runtime: Runtime, entries: list[StoredEntry], records: list[IdempotencyRecord]) -> None:
        """One durable transaction, retried on transient errors; failing means recovering again."""
        started = time.monotonic()
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                self.parts.store.append_batch(entries, records)
                break
            except SequenceConflict as exc:
                # After a lost commit acknowledgement the retry conflicts with itself: check.
                if attempt > 1 and self._already_stored(entries):
                    break
                self._request_recovery(runtime, "the database log does not continue the enclave's log")
                raise NotServing(_NOT_DURABLE) from exc
            except StoreError as exc:
                if attempt == _COMMIT_ATTEMPTS:
                    self._request_recovery(runtime, f"a commit failed: {exc.message}")
                    raise NotServing(_NOT_DURABLE) from exc
                time.sleep(self.parts.backoff.delay(attempt))
        self.metrics.record_commit(time.monotonic() - started, len(entries))

    def _already_stored(self, entries: list[StoredEntry]) -> bool:
        last = {entry.instance_id: entry for entry in entries}  # each instance's newest entry
        for entry in last.values():
            stored = self.parts.store.entries(
                entry.instance_id, after=entry.sequence - 1, through=entry.sequence
            )
            if not stored or stored[0].entry_hash != entry.entry_hash:
                return False
        return True

    def _housekeeping(self, runtime: Runtime) -> None:
        """After a batch is acknowledged: snapshots and compaction every `snapshot_every` entries."""
        if runtime.broken is not None:
            return
        now = self._clock()
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            try:
                self.parts.store.prune_responses(int((now - RESPONSE_TTL_S) * 1e6))
            except StoreError as exc:
                _log.warning("pruning old idempotency records failed (retried later): %s", exc)
        every = self.parts.config.snapshot_every
        for instance_id, state in list(runtime.instances.items()):
            if every <= 0 or state.head.sequence - state.snapshot_sequence < every:
                continue
            try:
                with runtime.apply_lock:
                    result = take_snapshot(
                        runtime.enclave,
                        self.parts.store,
                        instance_id,
                        confirmed=runtime.advancer.confirmed(instance_id),
                    )
            except (EnclaveCallError, StoreError) as exc:
                _log.warning("snapshot of %r failed (retried later): %s", instance_id, exc)
                continue
            state.snapshot_sequence = result.sequence
            self.metrics.record_snapshot(result.compacted)

    def query(
        self, instance_id: str, command: envelope_pb2.SealedCommand, timeout: float
    ) -> state_pb2.QueryResponse:
        """Run a read-only sealed command; a strict instance's answer waits for a read fence (the
        keyvault's word, asked for after the read, that the state read is its head or behind it)."""
        runtime = self._serving()
        self._instance(runtime, instance_id)
        try:
            with runtime.apply_lock:
                response = runtime.enclave.query(instance_id, command, self._now_ms())
        except EnclaveCallError as exc:
            raise from_ecall(exc.code, exc.message, method="Query") from None
        except EnclaveUnavailableError as exc:
            self._request_recovery(runtime, f"the enclave runner failed: {exc}")
            raise NotServing("the enclave runner failed; recovering") from exc
        outcome = response.outcome
        if outcome.HasField("error"):
            raise from_outcome_error(outcome.error.code, outcome.error.message)
        if response.read_round:
            runtime.advancer.request_read(instance_id)
            try:
                key = runtime.holds.read_key(instance_id, response.read_round).result(timeout)
            except concurrent.futures.TimeoutError:
                raise DeadlineExceeded(
                    "the answer waits for the keyvault to confirm the state it read; retry"
                ) from None
            try:
                unwrap_read(key, instance_id, response.read_round, outcome)
            except DecryptionError:
                self._request_recovery(runtime, "a held answer did not open under its released key")
                raise NotServing("the enclave misbehaved; recovering") from None
        return state_pb2.QueryResponse(outcome=outcome)

    # == instances ============================================================================
    def _instance_proto(self, runtime: Runtime, instance_id: str) -> state_pb2.Instance:
        state = self._instance(runtime, instance_id)
        return state_pb2.Instance(instance_id=instance_id, config=state.config, head=state.head)

    def descriptor(self, instance_id: str) -> envelope_pb2.InstanceDescriptor:
        """The instance's descriptor as its enclave signed it (once registered for this boot)."""
        descriptor = self._instance(self._serving(), instance_id).descriptor
        if descriptor is None:
            raise Unavailable(
                f"instance {instance_id!r} is not registered at the keyvault for this enclave yet; retry",
                reason="INSTANCE_NOT_REGISTERED",
            )
        return descriptor

    def list_instances(self) -> list[state_pb2.Instance]:
        runtime = self._serving()
        return [self._instance_proto(runtime, iid) for iid in sorted(runtime.instances)]

    def create_instance(
        self, instance_id: str, config: envelope_pb2.InstanceConfig, request_id: str, timeout: float
    ) -> tuple[state_pb2.Instance, envelope_pb2.InstanceDescriptor]:
        """Create an instance: its key at the keyvault, its genesis durable and registered there.

        Answers once the keyvault registered the genesis (so no other enclave can create the
        id again), with the descriptor the enclave signed.
        """
        runtime = self._serving()
        if not is_instance_id(instance_id):
            raise InvalidArgument(INSTANCE_ID_RULE)
        config_bytes = config.SerializeToString(deterministic=True)
        with runtime.create_lock:
            existing = self.parts.store.get_instance(instance_id)
            if existing is not None:
                if existing.config != config_bytes:
                    raise AlreadyExists(f"instance {instance_id!r} exists with another configuration")
            else:
                self._create_leased(runtime, instance_id, config, config_bytes)
        state = self._instance(runtime, instance_id)
        if state.descriptor is None:  # the genesis is held until the keyvault registers it
            try:
                runtime.holds.key(instance_id, 1).result(timeout)
            except concurrent.futures.TimeoutError:
                raise Unavailable(
                    f"instance {instance_id!r} is created but the keyvault has not registered it yet "
                    f"({runtime.advancer.problem() or 'advancing'}); retry the same request"
                ) from None
        return self._instance_proto(runtime, instance_id), self.descriptor(instance_id)

    def _create_leased(
        self, runtime: Runtime, instance_id: str, config: envelope_pb2.InstanceConfig, config_bytes: bytes
    ) -> None:
        """`_create`; the lease it takes (with the key release) is not kept when it fails: kept,
        it was renewed forever and the id answered INSTANCE_TAKING_OVER, never NOT_FOUND."""
        ownership = self._startup.ownership
        held = ownership.token(instance_id)
        try:
            self._create(runtime, instance_id, config, config_bytes)
        except BaseException:
            taken = ownership.token(instance_id)
            if taken and not held:
                ownership.forget(instance_id, taken)  # nothing serves it; it expires at the keyvault
            raise

    def _create(
        self, runtime: Runtime, instance_id: str, config: envelope_pb2.InstanceConfig, config_bytes: bytes
    ) -> None:
        runtime.provisioner.create_key(
            instance_id, runtime.mrenclave, sim=self.parts.config.enclave_mode == "sim"
        )
        runtime.provisioner.release(instance_id)
        # The keyvault states, for this enclave and its challenge, that no such instance exists.
        remote = self.parts.keyvault.get_commit_head(
            instance_id, runtime.keys.signing_public_key, runtime.enclave.issue_challenge(instance_id)
        )
        if remote.sequence or remote.statement is None:
            raise AlreadyExists(
                f"the keyvault holds commit head {remote.sequence} of {instance_id!r} but this database "
                "has no such instance; refusing to start a fork of it",
                metadata={"instance_id": instance_id, "sequence": str(remote.sequence)},
            )
        try:
            created = runtime.enclave.create_instance(instance_id, config, remote.statement, self._now_ms())
        except EnclaveCallError as exc:
            raise from_ecall(exc.code, exc.message, method="CreateInstance") from None
        stored = StoredEntry.of(created.entry)
        try:
            created_here = self.parts.store.create_instance(
                InstanceRecord(instance_id, config_bytes, int(self._clock() * 1e6)), stored
            )
        except StoreError:
            self._request_recovery(runtime, f"persisting the genesis entry of {instance_id!r} failed")
            raise
        if not created_here:  # another replica created it meanwhile (a shared PostgreSQL)
            self._request_recovery(runtime, f"instance {instance_id!r} was created elsewhere")
            raise AlreadyExists(f"instance {instance_id!r} was created by another replica")
        runtime.instances[instance_id] = InstanceState(config, created.link.head, 0)
        # With the key version, the keyvault prepares its hold root before the first batch asks.
        runtime.advancer.push(created.link, created.entry.key_version)
        runtime.reseal()
        _log.info("created instance %r (app %s)", instance_id, envelope_pb2.AppKind.Name(config.app))

    # == attestation and status ===============================================================
    def attestation_bundle(self) -> gateway_pb2.GetAttestationResponse:
        """The evidence a client verifies before sealing anything to this enclave."""
        runtime = self._serving()
        attestation: Attestation
        try:
            attestation = runtime.attestor.current()
            runtime.jwks = self.parts.keyvault.get_jwks().jwks_json
        except KeyvaultUnavailable:
            if not runtime.jwks:
                raise
            attestation = runtime.attestor.last()  # still valid for a while: serve it
        return gateway_pb2.GetAttestationResponse(
            quote=attestation.quote,
            runtime_data=attestation.runtime_data,
            nonce=attestation.nonce,
            attestation_token=attestation.token,
            keys=attestation.keys,
            jwks_json=runtime.jwks,
        )

    def status(self) -> state_pb2.GetStatusResponse:
        step, detail = self.lifecycle.current()
        with self._state_lock:
            runtime = self._runtime or self._startup.booting
        response = state_pb2.GetStatusResponse(
            step=step,
            detail=detail,
            commands=self.metrics.commands,
            commits=self.metrics.commits,
            ecalls=self._ecalls_before,
            holds_released_by_keyvault=self.metrics.holds_released_by_keyvault,
            holds_released_by_enclave=self.metrics.holds_released_by_enclave,
        )
        if runtime is None:
            return response
        response.ecalls += runtime.enclave.ecalls
        if step == lifecycle.SERVING:
            problem = runtime.advancer.problem()
            lag = runtime.advancer.total_lag()
            if problem:
                response.detail = f"{detail}; {problem}"
            elif lag:
                response.detail = f"{detail}; commit heads lag by {lag} entries"
        try:
            enclave_status = runtime.enclave.get_status()
        except (EnclaveCallError, EnclaveUnavailableError):
            return response
        response.memory_used_bytes = enclave_status.memory_used_bytes
        response.memory_budget_bytes = enclave_status.memory_budget_bytes
        return response


def _record(
    instance_id: str, item: Command, answer: state_pb2.ExecuteResponse, now_ms: int
) -> IdempotencyRecord:
    """The idempotency record that gives a retried request id its first answer."""
    return IdempotencyRecord(
        instance_id, item.request_id, answer.SerializeToString(deterministic=True), now_ms * 1000
    )
