"""The Python SDK: `connect()` to a gateway, verify the enclave, then seal, send and verify.

    from veil import connect, ExpectedMeasurement, load_identity
    veil = connect("127.0.0.1:50051", policy=load_policy(Path(".veil/expected-measurement.json")),
                   ca=Path(".veil/pki/ca.pem"), data_dir=Path(".veil"))
    alice = load_identity(Path(".veil"), "alice")
    veil.token("coins", alice).transfer(bob_account, 10)

`connect` fetches the default shard's attestation bundle and verifies it (veil.verify.bundle)
before returning: a mismatch raises `AttestationError` and nothing is ever sent. Each instance
is attested again on first use, because each state replica runs its own enclave with its own
keys; an attestation is reused until its token expires.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED with a RetryInfo hint)
are retried with the *same* request (same request_id, same sealed bytes), which the gateway
and the state service deduplicate, so a retried command executes once. Every sealing of a call,
re-seals included, goes out under the call's request id: the mesh's record under it is the
answer of whichever sealing ran (so a rerun under an application's id after lost records gets
an answer it cannot open, never a second run), and an answer to one sealing may be the record
of an earlier one: it is opened with each sealing's key and taken only when accepted.

Counters, and never running a command twice: a command carries the account's next counter,
and the enclave runs at most one command per counter. A *definitive* answer (one sealed to
this command's response key) that says "counter must be N" with another command as the user
of the counter is safe to follow: this command can never run under its own counter any more,
so it is sealed again under N. After an *ambiguous* attempt (the answer was lost, or the
gateway claimed the enclave could not open it, which the host could forge) the SDK re-seals
only under the same counter, and when the enclave says that counter is used it compares the
hash of the command that used it (typed, in the sealed answer) with every sealing of this
call: equal means the command ran (its recorded answer is fetched, or `ResultLost`); its own
counter, and only it, used by another command means this one never will (it is sent again under
the next); a counter used *and more after it* proves only that this delivery did not run (the
enclave names the last command only), so it and anything else it cannot prove raise
`OutcomeUnknown` instead of guessing.

A refusal before running is the call's answer only when the sealed bytes decide it (a
malformed call, an invalid proof) and no other sealing of the call may still run. One the host
controls (its memory budget, its clock against a token's expiry: the enclave's sealed
`may_run_later`) leaves that sealing valid in the host's hands, so the call is kept and
`NotRunYet` is raised: resume it by request id, never as a new call.

Before anything is sent, the account's sealed high-water mark is raised (`counters.seal`) and
the call is kept in `calls` (a file per call under `<data_dir>/calls/` with `connect`): a new
call is sealed above every counter sealed before it (a host may hold those sealings), and the
same request id resumes the call with the same bytes in this process or another one.

Batches (`execute_many`): one ExecuteBatch RPC carries up to MAX_BATCH commands of one
identity on one instance, sealed under the account's consecutive counters; the gateway hands
them to the state replica in that order, and the enclave runs them in it. Every answer is
verified exactly as `execute` verifies its own. What the batch did not settle is settled one
command at a time, in counter order, through `execute`'s own recovery: the same bytes under
the same request id first, re-sealed only under the same counter; a command is sealed under
a new counter only when the enclave's answer to it proves its counter was used by another
command, and then after the rest of the batch. A "wrong counter" answer that asks for a
*lower* counter (an earlier command of the batch was refused, or is still held) leaves the
sealing valid under its own counter, so such a command is never re-sealed under another one:
it is `OutcomeUnknown` when the counter before it cannot be filled.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from veil.enclave import commands, wire
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.sdk.apps import BallotClient, TokenClient, VaultClient
from veil.sdk.calls import CALLS_DIR, NODE_CALLS_DIR, CallStore, FileCalls, MemoryCalls
from veil.sdk.calls import PendingCall as _Call
from veil.sdk.counters import COUNTERS_FILE, CounterStore, FileCounters, MemoryCounters
from veil.sdk.errors import (
    CommandRefused,
    CounterGap,
    ForeignAnswer,
    GatewayError,
    IntegrityError,
    NotRunYet,
    NotSettledYet,
    OutcomeUnknown,
    RequestTooLarge,
    VeilClientError,
)
from veil.sdk.gateway_auth import check_bearer
from veil.sdk.heads import HEADS_FILE, HeadFloors
from veil.sdk.identity import Identity
from veil.sdk.pins import PINS_FILE, InstancePins
from veil.sdk.sealing import X25519_SUITE, Opened, SealedRequest, open_outcome, seal_command
from veil.sdk.trust_policy import ExpectedMeasurement
from veil.status import StatusError, error_info, retry_delay
from veil.verify.bundle import VerifiedAttestation, VerifiedDescriptor, verify_bundle, verify_descriptor
from veil.verify.errors import AttestationError

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 15.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The largest request the gateway accepts by default (its VEIL_GATEWAY_MAX_MESSAGE_BYTES).
MAX_REQUEST_BYTES = 1024 * 1024
_MAX_BACKOFF_S = 1.0
_MAX_ROUNDS = 6  # sealings of one call: re-attestations and counter resynchronisations
_PENDING_LIMIT = 10_000
_MAX_RETRY_HINT_S = 5.0
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# How long a call waits for another process working on the same account (in client timeouts).
_LOCK_WAIT_TIMEOUTS = 4
# Refusals before running that the command's own bytes decide (the app's call, the proof), when
# the enclave does not say the sealing may run later: that sealing can never run.
_FINAL_REFUSALS = frozenset(
    {
        error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT,
        error_pb2.ECALL_ERROR_CODE_UNIMPLEMENTED,
        error_pb2.ECALL_ERROR_CODE_UNAUTHENTICATED,
    }
)
# The state service's reason for a command sealed to keys its enclave no longer has (it
# restarted): such a command was never executed, so it is sealed again to the new keys.
_UNOPENABLE = "COMMAND_UNOPENABLE"
_STREAM_LIFETIME_REACHED = "STREAM_LIFETIME_REACHED"
_TOO_LARGE = "MESSAGE_TOO_LARGE"
#: Commands per ExecuteBatch (the gateway's cap).
MAX_BATCH = 256

Resp = TypeVar("Resp")


def _read(value: Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return value.read_bytes()


def _unopenable(error: GatewayError) -> bool:
    return error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == _UNOPENABLE


def _too_large(error: GatewayError) -> bool:
    """The gateway refused the request unread for its size (every resend would be refused too)."""
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == _TOO_LARGE


def _request_bytes(sealed: SealedRequest) -> int:
    """The encoded size of the ExecuteRequest that carries `sealed`."""
    return gateway_pb2.ExecuteRequest(
        instance_id=sealed.instance_id, command=sealed.command, request_id=sealed.request_id
    ).ByteSize()


# A read-only method of each app, sent as a *command* only to use up a counter that a call refused
# for good left unused below later sealings (any answer uses it, an app refusal included).
_GAP_FILLERS = {
    envelope_pb2.APP_KIND_TOKEN: apps_pb2.AppCall(token=apps_pb2.TokenCall(balance=apps_pb2.TokenBalance())),
    envelope_pb2.APP_KIND_VAULT: apps_pb2.AppCall(vault=apps_pb2.VaultCall(get=apps_pb2.VaultGet())),
    envelope_pb2.APP_KIND_BALLOT: apps_pb2.AppCall(ballot=apps_pb2.BallotCall(info=apps_pb2.BallotInfo())),
}
_FILLERS = frozenset(call.SerializeToString(deterministic=True) for call in _GAP_FILLERS.values())


def _may_run_later(result: command_pb2.CommandResult) -> bool:
    """Whether a sealed refusal before running leaves that sealing able to run later: the
    enclave says so (budget, clock), or (failing closed) it is not one of the refusals the sealed
    bytes alone decide (a malformed call, an invalid proof)."""
    return result.may_run_later or result.error.code not in _FINAL_REFUSALS


@dataclass(frozen=True)
class _Batch:
    """One `execute_many` call: whose, where, and its calls' states by index."""

    instance_id: str
    identity: Identity
    suite: int
    calls: Sequence[apps_pb2.AppCall]
    states: dict[int, _Call]


class _Restart(Exception):
    """A batched call's counter was used by another command: sealed again after the batch."""


#: The enclave's limit on a request id, which the gateway applies too (its `validation`).
MAX_REQUEST_ID = commands.MAX_REQUEST_ID_SIZE


def _check_request_id(request_id: str) -> None:
    """ValueError (nothing sealed, nothing kept) for an id the gateway or the enclave refuses:
    kept, such a call could never be sent, and every later call of the account waited for it;
    over 64 bytes the enclave refused it unsealed, and the call ran under another id."""
    if not commands.valid_request_id(request_id):
        raise ValueError(
            f"request id {request_id!r}: printable, 1 to {MAX_REQUEST_ID} bytes of UTF-8; nothing was sent"
        )


def _genesis(attestation: VerifiedAttestation) -> bytes:
    """The genesis of the instance an attestation's descriptor names (b"" for none): a head
    floor holds for that instance only, not for another created under the same id."""
    return attestation.descriptor.genesis_hash if attestation.descriptor is not None else b""


def _open_call_answer(
    outcome: envelope_pb2.CommandOutcome,
    sent: SealedRequest,
    signing_key: bytes,
    sealings: Sequence[tuple[SealedRequest, bytes]],
) -> Opened | None:
    """The enclave's answer to `sent`, one of a call's `sealings`.

    Every sealing of a call goes out under the call's own request id, so the mesh may answer
    with what it recorded for an earlier sealing (the one that ran), or join `sent` to one still
    in flight. Accepted, an earlier sealing's answer is the call's (its signed receipt names that
    sealing's command). Anything else it says of an earlier sealing says nothing of `sent`: None
    (ambiguous). CommandRefused for an unsealed refusal; ForeignAnswer when no sealing opens it.
    """
    try:
        return open_outcome(sent, outcome, signing_key, query=False)
    except ForeignAnswer as failure:
        for other, key in sealings:
            if other.command == sent.command:
                continue
            try:
                opened = open_outcome(other, outcome, key, query=False)
            except ForeignAnswer:
                continue
            return opened if opened.accepted else None
        raise failure from None


def _batch_answer(
    item: gateway_pb2.ExecuteBatchResponse | None, state: _Call
) -> Opened | VeilClientError | float | None:
    """One ExecuteBatch answer to the first sealing of `state`, judged as `execute` judges its
    own: the verified answer; None when it proves nothing (an unsealed refusal, or
    COMMAND_UNOPENABLE: ambiguous); the error `execute` would raise; or, for a missing or
    transient one, the delay before sending it again."""
    if item is None:
        return 0.0
    if item.WhichOneof("result") == "response":
        try:
            return _open_call_answer(item.response.outcome, *state.sealings[0], state.sealings)
        except (CommandRefused, IntegrityError):
            # The host's word, or an answer that does not open under this command's response
            # key (another command's answer at this index): ambiguous, the same bytes again.
            return None
    failed = StatusError(status_pb2.Status.FromString(item.status))
    hint = retry_delay(failed) if failed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if failed.code() in _RETRYABLE or (hint is not None and hint <= _MAX_RETRY_HINT_S):
        return hint or 0.0
    refused = GatewayError(failed)
    return None if _unopenable(refused) else refused


def _too_early(state: _Call, next_counter: int, *, fresh: bool, waiting: list[_Call]) -> None:
    """The enclave asks for a lower counter: the one before this call's is not used yet (an
    earlier sealing of this client is not settled: a batch or a call that ended without a
    definitive answer, or an earlier command of its batch refused before running). The sealing
    stays valid under its counter and may still run, so the call never takes another counter;
    a fresh sealing sent in order that is still early waits for those counters to be used."""
    state.ambiguous = True
    if fresh:
        ids = [c.request_id for c in waiting]
        resume = (
            f"resume the unsettled calls first (request ids {', '.join(ids)}), then this one"
            if ids
            else "an earlier sealing of this account (refused before running, or no longer kept) "
            "must be settled first"
        )
        raise CounterGap(
            f"{state.instance_id}: not run so far: the enclave waits for counter {next_counter} "
            f"before this command's {state.counter}; {resume} (request id {state.request_id}). "
            "Its sealing stays valid and runs once the counters before it are used, so the SDK "
            "never seals it under another counter",
            ids,
        )


def _unsettled_status(earlier: GatewayError) -> status_pb2.Status:
    """The status of a batched call left unsent behind an earlier one without a definitive answer."""
    code = earlier.code if earlier.code in _RETRYABLE else grpc.StatusCode.UNAVAILABLE
    return status_pb2.Status(
        code=code.value[0],
        message=f"not settled: an earlier command of the batch has no definitive answer ({earlier})",
    )


def _kept_answer(
    instance_id: str, state: command_pb2.CounterState, signing_key: bytes, request_id: str
) -> Opened | None:
    """The answer the enclave kept for the command that used the counter, if it verifies."""
    receipt = state.last_receipt
    if not state.HasField("last_receipt") or not wire.verify_receipt(receipt, signing_key):
        return None
    if (
        receipt.kind != envelope_pb2.RECEIPT_KIND_COMMAND
        or receipt.instance_id != instance_id
        or receipt.sequence != state.last_sequence
        or receipt.command_hash != state.last_command_hash
        or receipt.result_hash != hashlib.sha256(state.last_result).digest()
    ):
        return None
    try:
        result = command_pb2.CommandResult.FromString(state.last_result)
    except DecodeError:
        return None
    return Opened(
        request_id=request_id, result=result, receipt=receipt, accepted=True, sequence=receipt.sequence
    )


class ReceiptStream:
    """Verified outcomes of this client's own commands, as they commit; `cancel()` ends it.

    The gateway ends a stream after its maximum lifetime (STREAM_LIFETIME_REACHED): the stream
    subscribes again, replaying recent outcomes, and yields each request id once.
    """

    def __init__(
        self,
        subscribe: Callable[[bool], Any],
        opener: Callable[[gateway_pb2.WatchReceiptsResponse], Opened | None],
        *,
        replay_recent: bool,
    ) -> None:
        self._subscribe = subscribe
        self._opener = opener
        self._cancelled = False
        self._call = subscribe(replay_recent)

    def __iter__(self) -> Iterator[Opened]:
        seen: set[str] = set()
        while True:
            try:
                for item in self._call:
                    opened = self._opener(item)
                    if opened is not None and opened.request_id not in seen:
                        seen.add(opened.request_id)
                        yield opened
                return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED or self._cancelled:
                    return
                info = error_info(error)
                if info is None or info.reason != _STREAM_LIFETIME_REACHED:
                    raise GatewayError(error) from None
            self._call = self._subscribe(True)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class VeilClient:
    """A verified connection to a Veil gateway. Thread-safe; one account's commands run in order."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        policy: ExpectedMeasurement,
        data_dir: Path | None = None,
        api_key: str | None = None,
        bearer: str | None = None,
        counters: CounterStore | None = None,
        pins: InstancePins | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        calls: CallStore | None = None,
        heads: HeadFloors | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self._channel = channel
        self._stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.policy = policy
        self._root = policy.root_public_key(data_dir)
        self._api_key = api_key
        self._bearer = bearer
        self.counters = counters or MemoryCounters()
        #: Every sealed call without a definitive answer, kept before it is sent (resumable by id).
        self.calls: CallStore = calls or MemoryCalls()
        self.pins = pins or InstancePins()
        self.timeout = timeout
        #: A sealed command larger than this is refused before it is kept or sent (RequestTooLarge).
        self.max_request_bytes = max_request_bytes
        self._clock = clock
        self.session_prefix = secrets.token_hex(12)
        self._lock = threading.Lock()
        self._attestations: dict[str, VerifiedAttestation] = {}
        self._account_locks: dict[tuple[str, str], threading.Lock] = {}
        self._pending: OrderedDict[str, list[tuple[SealedRequest, bytes]]] = OrderedDict()
        self._answered: OrderedDict[str, tuple[_Call, Opened]] = OrderedDict()  # by request id
        #: Per instance: the newest head this client saw acknowledged (kept in the data dir).
        self.heads = heads or HeadFloors()
        # The audiences attested OAuth2 enclaves accept proofs for: the gateway bearer has none.
        self._enclave_audiences: set[str] = set()

    # --- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        with contextlib.suppress(OSError):  # a cache: an unwritable data dir only loses the floor
            self.heads.save()

    def __enter__(self) -> VeilClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_bearer(self, identity: Identity | None = None) -> None:
        """GatewayCredentialError when the gateway bearer is a token the enclave could accept."""
        with self._lock:
            known = frozenset(self._enclave_audiences)
        check_bearer(self._bearer, identity=identity, enclave_audiences=known)

    def _metadata(self, identity: Identity | None = None) -> tuple[tuple[str, str], ...]:
        """The gateway's credentials: only those given for it, never the identity's proof (an
        OAuth2 JWT is the enclave's, and the host runs the gateway). `identity`, the one the RPC
        acts for, is only checked against the bearer."""
        self._check_bearer(identity)
        metadata: list[tuple[str, str]] = []
        if self._api_key:
            metadata.append(("x-api-key", self._api_key))
        if self._bearer:
            metadata.append(("authorization", f"Bearer {self._bearer}"))
        return tuple(metadata)

    def _call(
        self, method: Callable[..., Resp], request: Any, metadata: Sequence[tuple[str, str]] = ()
    ) -> Resp:
        """One RPC within `timeout`, the same request retried on transient failures.

        Retries run until the deadline, not for a fixed count: a restarting gateway or state
        replica is back within seconds, and giving up earlier would leave the caller not
        knowing whether its command committed.
        """
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return method(request, timeout=max(remaining, 0.01), metadata=tuple(metadata))
            except grpc.RpcError as error:
                hint = retry_delay(error) if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                retryable = error.code() in _RETRYABLE or (hint is not None and hint <= _MAX_RETRY_HINT_S)
                delay = hint if hint is not None else min(_MAX_BACKOFF_S, 0.1 * 2**attempt)
                # No attempt without a fair slice of time left: the caller learns the real
                # failure (with its reason), not a deadline cut short.
                slice_s = min(_MAX_BACKOFF_S, self.timeout / 4)
                if not retryable or time.monotonic() + delay + slice_s >= deadline:
                    raise GatewayError(error) from None
                time.sleep(delay)
                attempt += 1

    def new_request_id(self) -> str:
        """A request id under this session's prefix (what WatchReceipts subscribes to)."""
        return f"{self.session_prefix}-{secrets.token_hex(12)}"

    # --- attestation -------------------------------------------------------------------------

    def attest(self, instance_id: str = "", *, refresh: bool = False) -> VerifiedAttestation:
        """The verified attestation of the enclave hosting `instance_id` ("" = the default shard)."""
        with self._lock:
            cached = self._attestations.get(instance_id)
        if cached is not None and not refresh and not cached.expired(self._clock()):
            return cached
        bundle = self._call(
            self._stub.GetAttestation,
            gateway_pb2.GetAttestationRequest(instance_id=instance_id),
            self._metadata(),
        )
        verified = verify_bundle(
            bundle, self.policy, root_public_key=self._root, now=self._clock(), instance_id=instance_id
        )
        if verified.descriptor is not None:
            config = verified.descriptor.config
            if config.auth_scheme == envelope_pb2.AUTH_SCHEME_OAUTH2 and config.oauth2_audience:
                # Known from now on: nothing more goes with a bearer for this audience.
                with self._lock:
                    self._enclave_audiences.add(config.oauth2_audience)
                self._check_bearer()
            # Trust on first use: an id names the instance first seen under it (the enclave gives
            # out a descriptor only once the keyvault registered it), and no other after.
            self.pins.check(verified.descriptor)
            if self.pins.get(instance_id) is None:
                self.pins.pin(verified.descriptor)
        with self._lock:
            self._attestations[instance_id] = verified
        return verified

    @property
    def attestation(self) -> VerifiedAttestation:
        """The default shard's verified attestation."""
        return self.attest()

    @staticmethod
    def _scheme(attestation: VerifiedAttestation, instance_id: str) -> envelope_pb2.AuthScheme.ValueType:
        """The auth scheme the enclave signed for the instance (never the gateway's word)."""
        descriptor = attestation.descriptor
        if descriptor is None or descriptor.instance_id != instance_id:
            raise VeilClientError(f"the enclave did not describe instance {instance_id!r}")
        return descriptor.config.auth_scheme

    def _seal(
        self,
        attestation: VerifiedAttestation,
        instance_id: str,
        identity: Identity,
        call: apps_pb2.AppCall,
        *,
        counter: int,
        request_id: str,
        suite: int,
    ) -> SealedRequest:
        """`call` sealed to the attested enclave, under the auth scheme it signed for the instance."""
        return seal_command(
            attestation.keys,
            instance_id=instance_id,
            scheme=self._scheme(attestation, instance_id),
            identity=identity,
            call=call,
            counter=counter,
            request_id=request_id,
            suite=suite,
        )

    def _seal_call(
        self,
        attestation: VerifiedAttestation,
        state: _Call,
        identity: Identity,
        call: apps_pb2.AppCall,
        suite: int,
    ) -> SealedRequest:
        """A sealing of `state`'s call: under its counter and, every sealing of it, under its
        request id (the mesh records the one that ran). RequestTooLarge, before anything is kept
        or sent, when the gateway would refuse it unread (every resend would be refused too)."""
        sealed = self._seal(
            attestation,
            state.instance_id,
            identity,
            call,
            counter=state.counter,
            request_id=state.request_id,
            suite=suite,
        )
        size = _request_bytes(sealed)
        if size > self.max_request_bytes:
            raise RequestTooLarge(size, self.max_request_bytes, earlier_sent=bool(state.sealings))
        return sealed

    # --- administration (admin certificate) --------------------------------------------------

    def create_instance(
        self, instance_id: str, config: envelope_pb2.InstanceConfig, *, request_id: str | None = None
    ) -> tuple[gateway_pb2.Instance, VerifiedDescriptor]:
        """Create an app instance (the gateway requires the admin client certificate).

        The answer's descriptor must be signed by the attested enclave of the instance and carry
        exactly the configuration asked for; the instance is then pinned (genesis and config).
        """
        if config.oauth2_audience:  # its enclave will accept that audience: never the gateway's
            check_bearer(self._bearer, enclave_audiences=[config.oauth2_audience])
        request = gateway_pb2.CreateInstanceRequest(
            instance_id=instance_id, config=config, request_id=request_id or self.new_request_id()
        )
        reply = self._call(self._stub.CreateInstance, request, self._metadata())
        attestation = self.attest(instance_id, refresh=True)
        descriptor = verify_descriptor(reply.descriptor, attestation.keys.signing_public_key, instance_id)
        if descriptor.config != config:
            raise AttestationError(
                f"instance {instance_id!r} was created with another configuration than asked for"
            )
        if attestation.descriptor is None or attestation.descriptor.genesis_hash != descriptor.genesis_hash:
            raise AttestationError(f"the enclave serving {instance_id!r} describes another instance")
        self.pins.pin(descriptor)
        return reply.instance, descriptor

    def list_instances(self) -> list[gateway_pb2.Instance]:
        """Every instance across shards (admin certificate)."""
        reply = self._call(self._stub.ListInstances, gateway_pb2.ListInstancesRequest(), self._metadata())
        return list(reply.instances)

    def status(self) -> gateway_pb2.GetStatusResponse:
        """The gateway's view of the mesh (any client certificate)."""
        return self._call(self._stub.GetStatus, gateway_pb2.GetStatusRequest(), self._metadata())

    # --- commands ----------------------------------------------------------------------------

    def _account_lock(self, instance_id: str, account: str) -> threading.Lock:
        with self._lock:
            return self._account_locks.setdefault((instance_id, account), threading.Lock())

    def _remember(self, sealed: SealedRequest, signing_key: bytes) -> None:
        with self._lock:
            self._pending.setdefault(sealed.request_id, []).append((sealed, signing_key))
            self._pending.move_to_end(sealed.request_id)
            while len(self._pending) > _PENDING_LIMIT:
                self._pending.popitem(last=False)

    def execute(
        self,
        instance_id: str,
        call: apps_pb2.AppCall,
        identity: Identity,
        *,
        request_id: str | None = None,
        suite: int = X25519_SUITE,
    ) -> Opened:
        """Run one command and return its verified answer (an app refusal is in `result.error`).

        Runs the command at most once whatever the gateway or the host does (see the module
        docstring). When it fails without a definitive answer (GatewayError), the error's
        `request_id` names the call: passing it again resumes the same call (same counter, same
        sealed bytes first) instead of starting a second one. Raises IntegrityError when the
        enclave asks for a counter at or below one it already accepted (a rolled-back log),
        OutcomeUnknown when it cannot prove whether an earlier attempt ran.
        """
        self._check_bearer(identity)  # before anything of the call is sent, its attestation included
        account = identity.account
        call_bytes = call.SerializeToString(deterministic=True)
        with (
            self._account_lock(instance_id, account),
            self.calls.locked(instance_id, account, _LOCK_WAIT_TIMEOUTS * self.timeout),
        ):
            answered, resumed = self._claim(instance_id, account, [(call_bytes, request_id)])[0]
            if answered is not None:
                # Settled: its answer again, nothing sent. (Its head raised the floor when it came;
                # a kept answer may be of an instance since created anew under the id.)
                return answered
            state = resumed or _Call(
                instance_id,
                request_id or self.new_request_id(),
                self._next_counter(instance_id, account),
                call_bytes,
                account=account,
                explicit=request_id is not None,
            )
            try:
                opened = self._run(state, call, identity, suite)
            except BaseException as failure:  # an AttestationError too: what was sent stays resumable
                self._keep_unresolved(state, failure)
                raise
            self._settled(state, opened)
            if not opened.accepted:
                self._fill_gap(state, identity, suite)
            return opened

    def _fill_gap(self, state: _Call, identity: Identity, suite: int) -> None:
        """A call refused for good left its counter unused, and this client sealed above it (the
        later calls of a batch, or unsettled ones): their sealings wait for that counter. Use it
        up now (`_fill`); if that fails, the next call answered "too early" fills it."""
        if self.counters.sealed(state.instance_id, state.account) > state.counter:
            self._fill(state.instance_id, state.account, state.counter, identity, suite)

    def _fill(self, instance_id: str, account: str, counter: int, identity: Identity, suite: int) -> bool:
        """Use `counter` up with the app's read-only call sent as a command; whether it is used.

        Only for a counter no kept call of this client may still use: then no sealing can run
        twice for it (another device's sealing under it is refused naming the filler, which
        proves it never ran). A filler is never kept: run later, it only uses its counter."""
        try:
            descriptor = self.attest(instance_id).descriptor
        except (VeilClientError, AttestationError):
            return False  # nothing is sent now; the calls waiting for the counter say so
        filler = _GAP_FILLERS.get(descriptor.config.app) if descriptor is not None else None
        if filler is None:
            return False
        call = filler.SerializeToString(deterministic=True)
        fill = _Call(instance_id, self.new_request_id(), counter, call, account=account)
        try:
            return self._run(fill, filler, identity, suite, batched=True).accepted
        except (_Restart, ForeignAnswer):  # another command (a second filler) used it: used all the same
            return True
        except RequestTooLarge as refused:  # "too large" (a lie: a filler is small), then used up
            return refused.sent
        except (VeilClientError, AttestationError):
            return False
        finally:
            self.calls.delete(fill.request_id)

    def _next_counter(self, instance_id: str, account: str) -> int:
        """A new call's counter: above the last accepted one and above every counter this client
        sealed (the high-water mark), whose sealing may still be held by the host."""
        return max(self.counters.last(instance_id, account), self.counters.sealed(instance_id, account)) + 1

    def _sealed(self, states: Sequence[_Call]) -> None:
        """Before anything is sent: raise the high-water mark and keep each call resumable."""
        if not states:
            return
        first = states[0]
        self.counters.seal(first.instance_id, first.account, max(s.counter for s in states))
        kept: list[_Call] = []
        try:
            for state in states:
                if not self.calls.keep(state):
                    raise VeilClientError(
                        f"request id {state.request_id!r} names another call (kept meanwhile by "
                        "another process or thread); this one was not sent"
                    )
                kept.append(state)
        except BaseException:
            for state in kept:  # nothing is sent: none of them stays kept
                with contextlib.suppress(VeilClientError):
                    self.calls.forget_call(state)
            raise

    def _unsent(self, states: Sequence[_Call]) -> None:
        """Calls whose only sealings were never sent (keeping one failed, and `_sealed` took back
        what it kept): below the high-water mark again, so no later call waits for them."""
        for state in states:
            state.sealings.clear()
        for state in sorted(states, key=lambda s: -s.counter):
            self.counters.unseal(state.instance_id, state.account, state.counter)

    def _claim(
        self, instance_id: str, account: str, calls: Sequence[tuple[bytes, str | None]]
    ) -> list[tuple[Opened | None, _Call | None]]:
        """For each (call, request id): its earlier answer, or the kept call it resumes (from the
        calls store: this process's, or an earlier process's on the same data dir).

        Refuses (ValueError, nothing sent, nothing taken) a request id that names another call.
        A resumed call stays in the store until it is settled.
        """
        found = []
        for call_bytes, request_id in calls:
            if request_id is not None:
                _check_request_id(request_id)
            with self._lock:
                answered = self._answered.get(request_id) if request_id else None
            resumed = self.calls.get(request_id) if request_id and answered is None else None
            if request_id and answered is None and resumed is None and self.calls.kept_elsewhere(request_id):
                raise ValueError(
                    f"request id {request_id!r} names a call the Node client keeps on this data dir "
                    "(node-calls/): resume it there; nothing was sent"
                )
            earlier = answered[0] if answered else resumed
            if earlier is not None and (
                (earlier.instance_id, earlier.call) != (instance_id, call_bytes)
                or earlier.account not in ("", account)
            ):
                raise ValueError(f"request id {request_id!r} already names another call; nothing was sent")
            # Settled before (in this process, or kept with its answer by any process): that answer.
            kept = answered[1] if answered else resumed.answer if resumed else None
            if resumed is not None:
                resumed.explicit = True  # named by its caller: kept with its answer once settled
            found.append((kept, resumed if kept is None else None))
        return found

    def _keep_unresolved(self, state: _Call, failure: BaseException) -> None:
        """No definitive answer: the command may or may not have run. Once anything was sent,
        keep the call (whatever the error) so a retry under its request id resumes it rather
        than sealing a second command; a call with nothing sealed is forgotten."""
        try:
            if not state.sealings:
                self.calls.forget_call(state)
            elif self.calls.keep(state) and isinstance(
                failure, (VeilClientError, AttestationError, KeyboardInterrupt)
            ):
                # The call to resume (never another call's: keep refused it); an interrupt too,
                # so the CLI can say which call a Ctrl-C left kept.
                failure.request_id = state.request_id  # type: ignore[union-attr]
        except VeilClientError:
            pass  # the store is out of reach: the entry kept before sending stands, the failure goes on

    def _settled(self, state: _Call, opened: Opened) -> None:
        """A definitive answer: the same id gets this answer. A call its caller named stays in the
        calls store with it (another process, or a rerun, must not seal it anew); the others leave."""
        with self._lock:
            self._answered[state.request_id] = (state, opened)
            while len(self._answered) > _PENDING_LIMIT:
                self._answered.popitem(last=False)
        if not opened.accepted:
            # Refused before running: its counter is unused and none of its sealings will run,
            # so when nothing was sealed above it the next call may take that counter.
            self.counters.unseal(state.instance_id, state.account, state.counter)
        if state.explicit:
            state.answer = opened
            self.calls.keep(state)  # never over another call's entry
        else:
            self.calls.forget_call(state)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop settled calls from the calls store, once the caller keeps their outcome durably
        itself (the CSV transfer's journal); a call not settled yet is never dropped."""
        for request_id in request_ids:
            kept = self.calls.get(request_id)
            if kept is not None and kept.answer is not None:
                self.calls.delete(request_id)

    def execute_many(
        self,
        instance_id: str,
        calls: Sequence[apps_pb2.AppCall],
        identity: Identity,
        *,
        request_ids: Sequence[str | None] | None = None,
        suite: int = X25519_SUITE,
    ) -> list[Opened | VeilClientError]:
        """Run up to MAX_BATCH commands of `identity` on one instance in one ExecuteBatch call.

        One result per call, in order: the verified answer `execute` would return, or the error
        it would raise (a `GatewayError` carries the call's `request_id`: passing it again, to
        `execute` or here, resumes that call). The commands take the account's next counters
        in the order given and run in that order; each runs at most once whatever the gateway
        or the host does (see the module docstring). `request_ids` names the calls as
        `execute`'s `request_id` does (None: fresh ids).
        """
        if not 0 < len(calls) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} calls")
        ids = list(request_ids) if request_ids is not None else [None] * len(calls)
        named = [i for i in ids if i]
        if len(ids) != len(calls) or len(set(named)) != len(named):
            raise ValueError("request_ids must name each call once")
        self._check_bearer(identity)  # before anything of the batch is sent, its attestation included
        account = identity.account
        wanted = [
            (call.SerializeToString(deterministic=True), rid) for call, rid in zip(calls, ids, strict=True)
        ]
        results: list[Opened | VeilClientError | None] = [None] * len(calls)
        with (
            self._account_lock(instance_id, account),
            self.calls.locked(instance_id, account, _LOCK_WAIT_TIMEOUTS * self.timeout),
        ):
            claimed = self._claim(instance_id, account, wanted)
            states: dict[int, _Call] = {}
            for index, (answered, resumed) in enumerate(claimed):
                if answered is not None:
                    results[index] = answered  # settled before (its head raised the floor then)
                elif resumed is not None:
                    resumed.ambiguous = True  # its earlier attempt may have run: same counter only
                    states[index] = resumed
            counter = max(
                [self._next_counter(instance_id, account), *(s.counter + 1 for s in states.values())]
            )
            for index, (call_bytes, request_id) in enumerate(wanted):
                if results[index] is None and index not in states:
                    states[index] = _Call(
                        instance_id,
                        request_id or self.new_request_id(),
                        counter,
                        call_bytes,
                        account=account,
                        explicit=request_id is not None,
                    )
                    counter += 1
            order = sorted(states, key=lambda i: states[i].counter)
            batch = _Batch(instance_id, identity, suite, calls, states)
            self._settle_batch(batch, order, self._send_batch(batch, order), results)
        return [r if r is not None else VeilClientError("a call was not settled") for r in results]

    def _seal_new(self, batch: _Batch, states: list[_Call], calls: list[apps_pb2.AppCall]) -> list[_Call]:
        """Seal the batch's calls that have no sealing yet (returned); none stays sealed when one
        is too large to send, since nothing of the batch is then kept or sent."""
        attestation = self.attest(batch.instance_id)
        signing_key = attestation.keys.signing_public_key
        fresh: list[_Call] = []
        try:
            for state, call in zip(states, calls, strict=True):
                if not state.sealings:
                    sealed = self._seal_call(attestation, state, batch.identity, call, batch.suite)
                    fresh.append(state)
                    self._remember(sealed, signing_key)
                    state.sealings.append((sealed, signing_key))
        except RequestTooLarge:
            for state in fresh:
                state.sealings.clear()
            raise
        return fresh

    def _send_batch(self, batch: _Batch, order: list[int]) -> list[Opened | VeilClientError | None]:
        """Seal what is new, send everything in one ExecuteBatch in counter order (its unanswered
        part again on transient failures, same bytes, as `_call` retries), judge each answer.

        Per call (in `order`): the verified answer; None when there is none to judge (lost, or
        the host's word: ambiguous, for `_run` to resend); or the error `execute` would raise.
        """
        instance_id, identity = batch.instance_id, batch.identity
        states = [batch.states[i] for i in order]
        calls = [batch.calls[i] for i in order]
        if not states:
            return []
        fresh = self._seal_new(batch, states, calls)
        try:
            self._sealed(fresh)  # kept durably before anything is sent
        except BaseException:
            self._unsent(fresh)
            raise
        answers: list[Opened | VeilClientError | None] = [None] * len(states)
        todo = list(range(len(states)))
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while todo:
            request = gateway_pb2.ExecuteBatchRequest(
                commands=[
                    gateway_pb2.ExecuteRequest(
                        instance_id=instance_id,
                        command=states[k].sealings[0][0].command,
                        request_id=states[k].sealings[0][0].request_id,
                    )
                    for k in todo
                ]
            )
            got: dict[int, gateway_pb2.ExecuteBatchResponse] = {}
            whole: grpc.RpcError | None = None
            try:
                stream = self._stub.ExecuteBatch(
                    request, timeout=max(deadline - time.monotonic(), 0.01), metadata=self._metadata(identity)
                )
                for item in stream:
                    got.setdefault(item.index, item)  # an index answered twice: the first counts
            except grpc.RpcError as error:
                whole = error  # what it did not answer stays unanswered
            again: list[int] = []
            delay = min(_MAX_BACKOFF_S, 0.1 * 2**attempt)
            for position, k in enumerate(todo):
                judged = _batch_answer(got.get(position), states[k])
                if isinstance(judged, float):  # transient: sent again (after its RetryInfo delay)
                    again.append(k)
                    delay = max(delay, judged)
                else:
                    answers[k] = judged
            retry_whole = whole is None or whole.code() in _RETRYABLE
            slice_s = min(_MAX_BACKOFF_S, self.timeout / 4)
            if not again or not retry_whole or time.monotonic() + delay + slice_s >= deadline:
                break  # what is left is resent one by one by `_run`, which retries on its own
            time.sleep(delay)
            attempt += 1
            todo = again
        return answers

    def _settle_batch(
        self,
        batch: _Batch,
        order: list[int],
        firsts: list[Opened | VeilClientError | None],
        results: list[Opened | VeilClientError | None],
    ) -> None:
        """Settle each batched call in counter order through `_run`; calls whose counter another
        command used are sealed again afterwards, under counters past the batch's."""
        instance_id, identity, states = batch.instance_id, batch.identity, batch.states
        stopped: GatewayError | None = None
        gap: CounterGap | None = None
        restarts: list[int] = []

        def siblings(index: int) -> frozenset[bytes]:
            return frozenset().union(*(s.hashes() for i, s in states.items() if i != index))

        def settle(index: int, first: Opened | VeilClientError | None, *, batched: bool) -> None:
            nonlocal stopped, gap
            state = states[index]
            try:
                if gap is not None and not (isinstance(first, Opened) and first.accepted):
                    # An earlier call of the batch waits for unsettled calls before it: so does
                    # this one (its sealing stays valid: never sealed again, not even resent now).
                    raise CounterGap(
                        f"{instance_id}: not run so far: an earlier command of the batch waits for "
                        f"unsettled calls ({gap})",
                        gap.waiting_for,
                    )
                if stopped is not None and not (isinstance(first, Opened) and first.accepted):
                    # An earlier call has no definitive answer: this one waits for it (resume both).
                    raise GatewayError(StatusError(_unsettled_status(stopped)))
                if isinstance(first, VeilClientError):
                    raise first
                opened = self._run(
                    state,
                    batch.calls[index],
                    identity,
                    batch.suite,
                    first=first,
                    siblings=siblings(index),
                    batched=batched,
                )
            except _Restart:
                restarts.append(index)
            except GatewayError as failure:
                self._keep_unresolved(state, failure)
                results[index] = failure
                stopped = stopped or failure
            except CounterGap as failure:
                self._keep_unresolved(state, failure)
                results[index] = failure
                gap = gap or failure
            except NotRunYet as failure:  # it may still run: the later calls wait for it
                self._keep_unresolved(state, failure)
                results[index] = failure
                gap = gap or CounterGap(str(failure), [state.request_id])
            except VeilClientError as failure:
                self._keep_unresolved(state, failure)
                results[index] = failure
            except BaseException as failure:  # an AttestationError: what was sent stays resumable
                self._keep_unresolved(state, failure)
                raise
            else:
                self._settled(state, opened)
                results[index] = opened
                if not opened.accepted:
                    self._fill_gap(state, identity, batch.suite)  # the later calls wait for its counter

        for position, index in enumerate(order):
            settle(index, firsts[position], batched=True)
        account = identity.account
        for index in restarts:
            past = max([self._next_counter(instance_id, account) - 1, *(s.counter for s in states.values())])
            states[index].restart(past + 1)
            settle(index, None, batched=False)

    def _run(
        self,
        state: _Call,
        call: apps_pb2.AppCall,
        identity: Identity,
        suite: int,
        *,
        first: Opened | None = None,
        siblings: frozenset[bytes] = frozenset(),
        batched: bool = False,
    ) -> Opened:
        """Run one call to a definitive answer (see the module docstring).

        For a batched call: `first` is the batch's verified answer to its sealing (judged without
        sending anything), `siblings` the hashes of the batch's other sealings, and a call whose
        counter another command used raises `_Restart` instead of taking the enclave's next one.
        """
        instance_id, account = state.instance_id, identity.account
        for round_ in range(_MAX_ROUNDS):
            try:
                sealed, signing_key, opened, fresh = self._attempt(
                    state, call, identity, suite, first=first if round_ == 0 else None, resume=round_ == 0
                )
            except ForeignAnswer as failure:
                return self._foreign_answer(state, identity, suite, failure)
            except GatewayError as failure:
                if not _too_large(failure) or not state.sealings:
                    raise
                # Refused unread, and every resend is the same bytes: use the counter up, so no
                # sealing of the call the host may hold can run, and drop the call.
                limit = failure.metadata.get("limit_bytes", "")
                too_large = RequestTooLarge(
                    _request_bytes(state.sealings[-1][0]), int(limit) if limit.isdigit() else None, sent=True
                )
                return self._foreign_answer(state, identity, suite, too_large)
            if opened is None:
                state.ambiguous = True  # the host may say so of a command that ran: same counter only
                continue
            if opened.accepted:
                self._record(instance_id, account, state.counter)
                self._saw(instance_id, opened.sequence)
                return opened
            if opened.result.error.code != error_pb2.ECALL_ERROR_CODE_ABORTED:
                if self._refused(state, sealed, opened, fresh=fresh or (first is not None and round_ == 0)):
                    return opened
                continue
            counter_state = self._counter_state(instance_id, account, opened, state, siblings, fresh=fresh)
            if counter_state.last_command_hash:
                # A sealing of this call used the counter: it ran. Never again.
                return self._ran(state, counter_state, signing_key, identity)
            if counter_state.next_counter <= state.counter:
                self._too_early(state, counter_state.next_counter, identity, suite, fresh=fresh)
                continue  # the same counter again (a filled gap, or an answer from before it moved)
            # The counter is used by another command (or was never ours to use): this call can
            # never run under it, so it is sealed again under the enclave's next counter.
            self._record(instance_id, account, counter_state.next_counter - 1)
            if batched:
                raise _Restart
            state.restart(counter_state.next_counter)
        if state.ambiguous:
            raise OutcomeUnknown(
                f"{instance_id}: no definitive answer after {_MAX_ROUNDS} sealings under counter "
                f"{state.counter}; one of them may have run, so the command is not sent again"
            )
        raise CommandRefused(
            error_pb2.ECALL_ERROR_CODE_ABORTED, "could not agree on a counter with the enclave"
        )

    def _ran(
        self, state: _Call, counter_state: command_pb2.CounterState, signing_key: bytes, identity: Identity
    ) -> Opened:
        """The answer of a call one of whose sealings used its counter (the enclave says so): the
        one the enclave kept with the counter, or, failing that, the mesh's record."""
        self._record(state.instance_id, identity.account, state.counter)
        answer = _kept_answer(state.instance_id, counter_state, signing_key, state.request_id)
        answer = answer or self._recorded_answer(state.sealings, counter_state.last_sequence, identity)
        # Its head is one this client has now seen acknowledged: later reads must not be older.
        self._saw(state.instance_id, answer.sequence)
        return answer

    def _attempt(
        self,
        state: _Call,
        call: apps_pb2.AppCall,
        identity: Identity,
        suite: int,
        *,
        first: Opened | None,
        resume: bool,
    ) -> tuple[SealedRequest, bytes, Opened | None, bool]:
        """One attempt of `_run`: the sealing it judges, its signing key, the verified answer
        (None: ambiguous) and whether the sealing was made for this attempt. `first`: the
        batch's answer to the first sealing (nothing sent); `resume`: a kept sealing goes first."""
        instance_id = state.instance_id
        if first is not None:
            sealed, signing_key = state.sealings[0]  # the one the batch sent and judged
            return sealed, signing_key, first, False
        if state.sealings and resume:
            # Resuming: the very same bytes first (the mesh may hold their answer), and the call
            # counts as possibly run.
            sealed, signing_key = state.sealings[0]
            state.ambiguous = True
            return sealed, signing_key, self._send(sealed, signing_key, identity, state), False
        attestation = self.attest(instance_id, refresh=state.ambiguous and not resume)
        sealed = self._seal_call(attestation, state, identity, call, suite)
        signing_key = attestation.keys.signing_public_key
        self._remember(sealed, signing_key)
        state.sealings.append((sealed, signing_key))
        try:
            self._sealed([state])  # kept durably before it is sent
        except BaseException:
            state.sealings.pop()  # never sent
            if not state.sealings:
                self._unsent([state])
            raise
        return sealed, signing_key, self._send(sealed, signing_key, identity, state), True

    def _foreign_answer(
        self, state: _Call, identity: Identity, suite: int, failure: ForeignAnswer | RequestTooLarge
    ) -> Opened:
        """The mesh answered the call's request id with what none of its sealings opens (its record
        of a sealing this client does not hold: the call ran before, from a client that lost its
        records, or another call took the id), or refused it unread as too large. No sealing of
        this call ran through that request, but each stays valid in the host's hands under the
        call's counter, and later calls would wait for it: use the counter up with the app's
        read-only filler, so none ever can.

        Returns the call's answer when the enclave says one of its sealings used the counter after
        all (a host that ran it under another id). Raises `failure` with the call's sealings
        dropped (it leaves the calls store) once the counter is used by the filler or another
        command; NotSettledYet, the call kept, when the counter cannot be used up now.
        """
        instance_id, account = state.instance_id, identity.account
        # Why the call is kept when its counter cannot be used up (never "nothing ran").
        cause = failure.refusal if isinstance(failure, RequestTooLarge) else str(failure)
        try:
            attestation = self.attest(instance_id)
            descriptor = attestation.descriptor
            filler = _GAP_FILLERS.get(descriptor.config.app) if descriptor is not None else None
            if filler is None:
                raise failure
            sealed = self._seal(
                attestation,
                instance_id,
                identity,
                filler,
                counter=state.counter,
                request_id=self.new_request_id(),
                suite=suite,
            )
            signing_key = attestation.keys.signing_public_key
            filled = open_outcome(sealed, self._execute(sealed, identity).outcome, signing_key, query=False)
        except (VeilClientError, AttestationError):
            raise NotSettledYet(instance_id, state.request_id, cause) from failure  # the call is kept
        if filled.accepted:
            self._record(instance_id, account, state.counter)
        elif filled.result.error.code != error_pb2.ECALL_ERROR_CODE_ABORTED:
            # Refused for now (a budget, a clock): the counter stays open, the call is kept.
            raise NotSettledYet(instance_id, state.request_id, cause) from failure
        else:
            counter_state = self._counter_state(instance_id, account, filled, state)
            if counter_state.last_command_hash:
                # A sealing of this call used the counter after all: it ran.
                return self._ran(state, counter_state, signing_key, identity)
            if counter_state.next_counter <= state.counter:
                # An earlier counter is still open: the call is kept, and waits.
                raise NotSettledYet(instance_id, state.request_id, cause) from failure
            self._record(instance_id, account, counter_state.next_counter - 1)
        state.sealings.clear()  # none of them can run any more: nothing later waits for the call
        raise failure

    def _refused(self, state: _Call, sealed: SealedRequest, opened: Opened, *, fresh: bool) -> bool:
        """Judge a sealed refusal before running (not a counter refusal): True when the call is
        refused for good; False to seal it again under the same counter; raises to leave it
        unsettled. `fresh`: `sealed` was sealed for this attempt (not a kept sealing resent)."""
        refusal = opened.result.error
        if _may_run_later(opened.result):
            # Refused for now by what the host controls (its budget, its clock): this sealing
            # stays valid in its hands and may run later, so the call is never taken as refused.
            # A kept sealing resent earns one fresh sealing under the same counter (a renewed
            # token); a fresh one leaves the call unsettled.
            state.ambiguous = True
            if fresh:
                raise NotRunYet(state.instance_id, state.request_id, refusal.code, refusal.message)
            return False
        # Refused for good: this sealing can never run. So is the call once none of its
        # sealings can (an earlier one, sent without a definitive answer, still may).
        state.drop(sealed)
        if not state.sealings:
            return True
        self.calls.keep(state)  # never over another call's entry
        raise OutcomeUnknown(
            f"{state.instance_id}: the enclave refused this call's latest sealing "
            f"({error_pb2.EcallErrorCode.Name(refusal.code)}: {refusal.message}), but an earlier sealing "
            "of it, sent without a definitive answer, may still run; resume it with its request id "
            "to settle that one"
        )

    def _execute(self, sealed: SealedRequest, identity: Identity) -> gateway_pb2.ExecuteResponse:
        """One Execute of a sealing, byte for byte under its own request id (retried as `_call`
        retries)."""
        request = gateway_pb2.ExecuteRequest(
            instance_id=sealed.instance_id, command=sealed.command, request_id=sealed.request_id
        )
        return self._call(self._stub.Execute, request, self._metadata(identity))

    def _send(
        self,
        sealed: SealedRequest,
        signing_key: bytes,
        identity: Identity,
        state: _Call,
    ) -> Opened | None:
        """The enclave's verified answer to one sealing of a call (or the call's answer the mesh
        recorded for another of its sealings); None when the answer is the host's word (an
        unsealed refusal), which proves nothing either way."""
        try:
            reply = self._execute(sealed, identity)
            try:
                return _open_call_answer(reply.outcome, sealed, signing_key, state.sealings)
            except ForeignAnswer:
                # Perhaps the answer of a sealing another process made of this call: its
                # sealings from the calls store, then the answer once more.
                self._merge_kept(state)
                return _open_call_answer(reply.outcome, sealed, signing_key, state.sealings)
        except GatewayError as failure:
            if _unopenable(failure):
                return None
            raise
        except CommandRefused:
            # An unsealed refusal ("could not open it", "over the memory budget") is not
            # authenticated: the host can say so of a command that ran. Ambiguous, like a lost
            # answer: only the same counter again, where the enclave names the sealing that used it.
            return None

    def _too_early(self, state: _Call, gap: int, identity: Identity, suite: int, *, fresh: bool) -> None:
        """The enclave waits for counter `gap`, below this call's. When no kept call of this
        client may use it (one refused for good, a filler that did not run, a crash before one),
        use it up and go on; otherwise this call waits (`_too_early`: CounterGap when fresh)."""
        waiting = self._waiting(state)
        if (
            fresh
            and state.call not in _FILLERS
            and not any(c.counter == gap for c in waiting)
            and self._fill(state.instance_id, state.account, gap, identity, suite)
        ):
            return
        _too_early(state, gap, fresh=fresh, waiting=waiting)

    def _waiting(self, state: _Call) -> list[_Call]:
        """The kept calls this one waits for: this account's, under lower counters (a filler a
        crashed process left behind is none: it only uses its counter)."""
        used = self.counters.last(state.instance_id, state.account)
        return [
            c
            for c in self.calls.pending(state.instance_id, state.account)
            if used < c.counter < state.counter
            and c.request_id != state.request_id
            and c.call not in _FILLERS
        ]

    def _record(self, instance_id: str, account: str, counter: int) -> None:
        """Remember `counter` as used, never moving the cache back (a batch settles out of order)."""
        if counter > self.counters.last(instance_id, account):
            self.counters.record(instance_id, account, counter)

    def _counter_state(
        self,
        instance_id: str,
        account: str,
        opened: Opened,
        state: _Call,
        siblings: frozenset[bytes] = frozenset(),
        *,
        fresh: bool = True,
    ) -> command_pb2.CounterState:
        """Judge a "wrong counter" answer: whether this call ran, may have, or never can.

        Returns the enclave's counter state with `last_command_hash` kept only when it names one
        of the call's sealings (it ran); raises when following it could roll back or run the
        call twice.
        """
        if not opened.result.HasField("counter") or opened.result.counter.next_counter < 1:
            raise IntegrityError(f"{instance_id}: the enclave refused the counter without its state")
        counter_state = command_pb2.CounterState()
        counter_state.CopyFrom(opened.result.counter)
        used = counter_state.next_counter - 1
        if used == state.counter and counter_state.last_command_hash not in state.hashes():
            self._merge_kept(state)  # a sealing another process made of this call, kept before sent
        if used == state.counter and counter_state.last_command_hash in state.hashes():
            return counter_state
        by_sibling = counter_state.last_command_hash in siblings
        counter_state.ClearField("last_command_hash")
        if not fresh and counter_state.next_counter <= state.counter:
            # Too early, in an answer that may predate counters accepted since (a batch's
            # answers come concurrently; a resent sealing may be answered from a cache): it
            # proves no rollback; the caller seals again under the same counter and judges that.
            return counter_state
        last = self.counters.last(instance_id, account)
        if used < last:
            # The enclave forgot commands it acknowledged to us: its log was rolled back
            # (a host restoring an old database). Never follow it there.
            raise IntegrityError(
                f"{instance_id}: the enclave asks for counter {counter_state.next_counter}, but counter "
                f"{last} was already accepted: its log was rolled back"
            )
        if by_sibling and used > state.counter:
            # Moved on by this client's own commands of the batch, which could run only after
            # this call's counter was used: perhaps by this call, and the enclave names only the last.
            raise OutcomeUnknown(
                f"{instance_id}: the account's counter moved from {state.counter} to {used} by later "
                "commands of the same batch; the SDK cannot prove whether this one ran and does not "
                "send it again"
            )
        if used > state.counter:
            # A genuine refusal proves only that *this delivery* did not run. The enclave names
            # the last command only: this call may have used its own counter before the later
            # ones (a host that ran it, then a sealing it held, then replayed it). Only
            # `used == state.counter` with another command's hash proves it never ran.
            self._record(instance_id, account, used)  # the account's counter, for the next call
            raise OutcomeUnknown(
                f"{instance_id}: the account's counter moved from {state.counter} to {used}, and the "
                "enclave names only the command that used the last one; the SDK cannot prove whether "
                "this one ran under its own counter before them and does not send it again"
            )
        return counter_state

    def _merge_kept(self, state: _Call) -> None:
        """Add the sealings the calls store holds for this call under its counter (another process
        may have resumed it meanwhile), so "used by another command" is never said of them."""
        try:
            stored = self.calls.get(state.request_id)
        except VeilClientError:
            return
        if stored is None or stored is state or stored.counter != state.counter:
            return
        if not stored.same_call(state):
            return  # another call under the same id (the store is keyed by id): never this one's
        known = {sealed.command.SerializeToString() for sealed, _ in state.sealings}
        state.sealings.extend(s for s in stored.sealings if s[0].command.SerializeToString() not in known)

    def _recorded_answer(
        self,
        attempts: list[tuple[SealedRequest, bytes]],
        sequence: int,
        identity: Identity,
    ) -> Opened:
        """The answer of the attempt that ran, from the mesh's idempotency records if it kept it
        (one request per request id: a call's sealings share one, except those kept from before
        they did)."""
        asked: set[str] = set()
        for sealed, signing_key in reversed(attempts):
            if sealed.request_id in asked:
                continue
            asked.add(sealed.request_id)
            try:
                reply = self._execute(sealed, identity)
                opened = _open_call_answer(reply.outcome, sealed, signing_key, attempts)
            except VeilClientError:
                continue
            if opened is not None and opened.accepted and opened.sequence == sequence:
                return opened
        return Opened(
            request_id=attempts[0][0].request_id,
            result=command_pb2.CommandResult(),
            receipt=None,
            accepted=True,
            sequence=sequence,
            result_lost=True,
        )

    def query(
        self, instance_id: str, call: apps_pb2.AppCall, identity: Identity, *, suite: int = X25519_SUITE
    ) -> Opened:
        """Run one read-only call (no counter, nothing logged) and return its verified answer.

        The answer must read a head at or after every head this client saw acknowledged before
        the call (monotonic reads): an older one is a host serving a stale or rolled-back boot.
        """
        self._check_bearer(identity)  # before anything of the call is sent, its attestation included
        for attempt in range(2):
            attestation = self.attest(instance_id, refresh=attempt > 0)
            floor = self.heads.floor(instance_id, _genesis(attestation))
            sealed = self._seal(
                attestation,
                instance_id,
                identity,
                call,
                counter=0,
                request_id=self.new_request_id(),
                suite=suite,
            )
            try:
                reply = self._call(
                    self._stub.Query,
                    gateway_pb2.QueryRequest(instance_id=instance_id, command=sealed.command),
                    self._metadata(identity),
                )
            except GatewayError as failure:
                if _unopenable(failure) and attempt == 0:
                    continue
                raise
            try:
                opened = open_outcome(sealed, reply.outcome, attestation.keys.signing_public_key, query=True)
            except CommandRefused as refusal:
                if refusal.code != error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT or attempt > 0:
                    raise
                continue
            if opened.receipt is not None:
                if opened.receipt.sequence < floor:
                    raise IntegrityError(
                        f"{instance_id}: the answer reads head {opened.receipt.sequence}, but this client "
                        f"already saw head {floor} acknowledged: a stale or rolled-back enclave"
                    )
                self._saw(instance_id, opened.receipt.sequence)
            if opened.result.counter.next_counter > 0:
                # The enclave's word on the account's counter, fresh for this call: a client with
                # no record of it (a new data dir) seals its next call there, not at 1 (which,
                # refused with the counter moved past, could only be OutcomeUnknown).
                self._record(instance_id, identity.account, opened.result.counter.next_counter - 1)
            return opened
        raise AssertionError("unreachable")

    def head_floor(self, instance_id: str) -> int:
        """The newest head of the instance (as attested) this client, or an earlier one on the
        same data dir, saw acknowledged: reads older than it are refused (0 before any)."""
        with self._lock:
            attestation = self._attestations.get(instance_id)
        return self.heads.floor(instance_id, _genesis(attestation)) if attestation is not None else 0

    def _saw(self, instance_id: str, sequence: int) -> None:
        with self._lock:
            attestation = self._attestations.get(instance_id)
        if attestation is not None:  # every answer this client judged came after its attestation
            self.heads.saw(instance_id, _genesis(attestation), sequence)

    def watch_receipts(
        self, instance_id: str, *, identity: Identity | None = None, replay_recent: bool = True
    ) -> ReceiptStream:
        """Stream the verified outcomes of this client's commands on `instance_id` as they commit.

        The gateway keys the stream to the caller its credentials name; `identity` (whose calls
        are awaited) is only checked against the gateway bearer, never sent."""
        self._check_bearer(identity)
        request = gateway_pb2.WatchReceiptsRequest(
            instance_id=instance_id, request_id_prefix=self.session_prefix, replay_recent=replay_recent
        )

        def subscribe(replay: bool) -> Any:
            request.replay_recent = replay
            return self._stub.WatchReceipts(request, metadata=self._metadata(identity))

        def opener(item: gateway_pb2.WatchReceiptsResponse) -> Opened | None:
            with self._lock:
                pending = list(self._pending.get(item.request_id, ()))
            if not pending:
                return None  # another session of the same principal
            # The outcome of one of the call's sealings (all share its request id).
            opened = _open_call_answer(item.outcome, *pending[-1], pending)
            if opened is None or not opened.accepted:
                # Commits only: a refusal here is the gateway's choice to publish it (the honest
                # one publishes none), and one the host controls may still be followed by the
                # commit of the same sealing, which must not be hidden as a repeat.
                return None
            self._saw(instance_id, opened.sequence)  # acknowledged: later reads must not be older
            return opened

        return ReceiptStream(subscribe, opener, replay_recent=replay_recent)

    # --- typed apps ----------------------------------------------------------------------------

    def vault(self, instance_id: str, identity: Identity) -> VaultClient:
        """Typed vault calls as `identity`."""
        return VaultClient(self, instance_id, identity)

    def token(self, instance_id: str, identity: Identity) -> TokenClient:
        """Typed token calls as `identity`."""
        return TokenClient(self, instance_id, identity)

    def ballot(self, instance_id: str, identity: Identity) -> BallotClient:
        """Typed ballot calls as `identity`."""
        return BallotClient(self, instance_id, identity)


def connect(
    address: str = DEFAULT_GATEWAY,
    *,
    policy: ExpectedMeasurement,
    ca: Path | bytes | None = None,
    cert: Path | bytes | None = None,
    key: Path | bytes | None = None,
    data_dir: Path | None = None,
    api_key: str | None = None,
    bearer: str | None = None,
    counters: CounterStore | None = None,
    pins: InstancePins | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    clock: Callable[[], float] = time.time,
    calls: CallStore | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> VeilClient:
    """Connect over TLS and verify the default shard's enclave; AttestationError if it does not pass.

    `ca` verifies the gateway's certificate (None: the system roots); `cert`/`key` present a
    client certificate (the admin's, for CreateInstance/ListInstances). `data_dir` resolves a
    "dev" root in the policy and keeps counters in `<data_dir>/counters.json` (the sealed
    high-water mark in `<data_dir>/sealed.json`), sealed calls until settled in
    `<data_dir>/calls/` (so another process resumes them by request id) and instance pins in
    `<data_dir>/instances.json`.

    `api_key` and `bearer` authenticate to the gateway (its `api_key` and `oauth2` plugins) and
    go in metadata, which the host reads: `bearer` is a token for the gateway's audience, never
    an OAuth2 identity's JWT nor one for an instance's enclave audience, which the enclave would
    accept as an account's proof (refused before it is sent: `GatewayCredentialError`; see
    `veil.sdk.gateway_auth`). An `OAuth2Identity`'s JWT only ever travels sealed.

    `max_request_bytes` is the gateway's request limit (its VEIL_GATEWAY_MAX_MESSAGE_BYTES, 1 MiB
    by default): a larger sealed command is refused before it is kept or sent (RequestTooLarge).
    """
    if (cert is None) != (key is None):
        raise VeilClientError("a client certificate needs both cert and key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),  # the SDK retries itself, with the same request_id
        # gRPC's reconnect back-off grows to 120 s by default; a restarted gateway is back
        # within seconds and should be reached within the SDK's retry deadline.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.secure_channel(address, credentials, options=options)
    if counters is None and data_dir is not None:
        counters = FileCounters(data_dir / COUNTERS_FILE)
    if pins is None and data_dir is not None:
        pins = InstancePins(data_dir / PINS_FILE)
    if calls is None and data_dir is not None:
        calls = FileCalls(data_dir / CALLS_DIR, also_pending=[data_dir / NODE_CALLS_DIR])
    heads = HeadFloors(data_dir / HEADS_FILE) if data_dir is not None else None
    client = VeilClient(
        channel,
        policy=policy,
        data_dir=data_dir,
        api_key=api_key,
        bearer=bearer,
        counters=counters,
        pins=pins,
        timeout=timeout,
        clock=clock,
        calls=calls,
        heads=heads,
        max_request_bytes=max_request_bytes,
    )
    try:
        client.attest()
    except BaseException:
        client.close()
        raise
    return client
