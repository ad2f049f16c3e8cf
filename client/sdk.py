"""The Python SDK: `connect()` to a gateway, verify the enclave, then seal, send and verify.

    from client import connect, ExpectedMeasurement, load_identity
    veil = connect("127.0.0.1:50051", policy=load_policy(Path(".veil/expected-measurement.json")),
                   ca=Path(".veil/pki/ca.pem"), data_dir=Path(".veil"))
    alice = load_identity(Path(".veil"), "alice")
    veil.token("coins", alice).transfer(bob_account, 10)

`connect` fetches the default shard's attestation bundle and verifies it (client.attestation)
before returning: a mismatch raises `AttestationError` and nothing is ever sent. Each instance
is attested again on first use, because each state replica runs its own enclave with its own
keys; an attestation is reused until its token expires.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED with a RetryInfo hint)
are retried with the *same* request (same request_id, same sealed bytes), which the gateway
and the state service deduplicate, so a retried command executes once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from client.apps import BallotClient, TokenClient, VaultClient
from client.attestation import VerifiedAttestation, verify_bundle
from client.counters import COUNTERS_FILE, CounterStore, FileCounters, MemoryCounters, expected_counter
from client.errors import CommandRefused, GatewayError, IntegrityError, VeilClientError
from client.identity import Identity
from client.policy import ExpectedMeasurement
from client.sealing import X25519_SUITE, Opened, SealedRequest, open_outcome, seal_command

DEFAULT_GATEWAY = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 15.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_MAX_BACKOFF_S = 1.0
_COUNTER_RESYNCS = 3
_PENDING_LIMIT = 10_000
_MAX_RETRY_HINT_S = 5.0
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# The state service's reason for a command sealed to keys its enclave no longer has (it
# restarted): such a command was never executed, so it is sealed again to the new keys.
_UNOPENABLE = "COMMAND_UNOPENABLE"

Resp = TypeVar("Resp")


def _read(value: Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return value.read_bytes()


def _unopenable(error: GatewayError) -> bool:
    return error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == _UNOPENABLE


def _retry_hint(error: grpc.RpcError) -> float | None:
    """The server's RetryInfo delay, if it sent one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # a call's RpcError is also a Call
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class ReceiptStream:
    """Verified outcomes of this client's own commands, as they commit; `cancel()` ends it."""

    def __init__(
        self, call: Any, opener: Callable[[gateway_pb2.WatchReceiptsResponse], Opened | None]
    ) -> None:
        self._call = call
        self._opener = opener

    def __iter__(self) -> Iterator[Opened]:
        try:
            for item in self._call:
                opened = self._opener(item)
                if opened is not None:
                    yield opened
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                raise GatewayError(error) from None

    def cancel(self) -> None:
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
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._channel = channel
        self._stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.policy = policy
        self._root = policy.root_public_key(data_dir)
        self._api_key = api_key
        self._bearer = bearer
        self.counters = counters or MemoryCounters()
        self.timeout = timeout
        self._clock = clock
        self.session_prefix = secrets.token_hex(12)
        self._lock = threading.Lock()
        self._attestations: dict[str, VerifiedAttestation] = {}
        self._account_locks: dict[tuple[str, str], threading.Lock] = {}
        self._pending: OrderedDict[str, tuple[SealedRequest, bytes]] = OrderedDict()

    # --- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VeilClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self, identity: Identity | None = None) -> tuple[tuple[str, str], ...]:
        metadata: list[tuple[str, str]] = []
        if self._api_key:
            metadata.append(("x-api-key", self._api_key))
        bearer = (identity.bearer if identity is not None else None) or self._bearer
        if bearer:
            metadata.append(("authorization", f"Bearer {bearer}"))
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
                hint = _retry_hint(error) if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
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
        verified = verify_bundle(bundle, self.policy, root_public_key=self._root, now=self._clock())
        with self._lock:
            self._attestations[instance_id] = verified
        return verified

    @property
    def attestation(self) -> VerifiedAttestation:
        """The default shard's verified attestation."""
        return self.attest()

    def _scheme(
        self, attestation: VerifiedAttestation, instance_id: str
    ) -> envelope_pb2.AuthScheme.ValueType:
        if attestation.instance is None or attestation.instance.instance_id != instance_id:
            raise VeilClientError(f"the gateway did not describe instance {instance_id!r}")
        return attestation.instance.config.auth_scheme

    # --- administration (admin certificate) --------------------------------------------------

    def create_instance(
        self, instance_id: str, config: envelope_pb2.InstanceConfig, *, request_id: str | None = None
    ) -> gateway_pb2.Instance:
        """Create an app instance (the gateway requires the admin client certificate)."""
        request = gateway_pb2.CreateInstanceRequest(
            instance_id=instance_id, config=config, request_id=request_id or self.new_request_id()
        )
        reply = self._call(self._stub.CreateInstance, request, self._metadata())
        return reply.instance

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
            self._pending[sealed.request_id] = (sealed, signing_key)
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

        The account's counter comes from the counter store; a stale (lower) one is
        resynchronised from the enclave's ABORTED answer (with a new request_id), while an
        enclave asking for a counter at or below one it already accepted is a rolled-back log
        and raises IntegrityError. An unopenable command
        (the enclave restarted with new keys) is attested and sealed again once.
        """
        account = identity.account
        with self._account_lock(instance_id, account):
            reattested = False
            for resync in range(_COUNTER_RESYNCS + 1):
                attestation = self.attest(instance_id)
                counter = self.counters.last(instance_id, account) + 1
                sealed = seal_command(
                    attestation.keys,
                    instance_id=instance_id,
                    scheme=self._scheme(attestation, instance_id),
                    identity=identity,
                    call=call,
                    counter=counter,
                    request_id=request_id if (request_id and resync == 0) else self.new_request_id(),
                    suite=suite,
                )
                self._remember(sealed, attestation.keys.signing_public_key)
                request = gateway_pb2.ExecuteRequest(
                    instance_id=instance_id, command=sealed.command, request_id=sealed.request_id
                )
                try:
                    reply = self._call(self._stub.Execute, request, self._metadata(identity))
                except GatewayError as failure:
                    if _unopenable(failure) and not reattested:
                        reattested = True
                        self.attest(instance_id, refresh=True)
                        continue
                    raise
                try:
                    opened = open_outcome(
                        sealed, reply.outcome, attestation.keys.signing_public_key, query=False
                    )
                except CommandRefused as refusal:
                    if refusal.code == error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT and not reattested:
                        reattested = True
                        self.attest(instance_id, refresh=True)
                        continue
                    raise
                if opened.accepted:
                    self.counters.record(instance_id, account, counter)
                error = opened.result.error if opened.result.HasField("error") else None
                if error is not None and error.code == error_pb2.ECALL_ERROR_CODE_ABORTED:
                    wanted = expected_counter(error.message)
                    if wanted is not None and wanted <= self.counters.last(instance_id, account):
                        # The enclave forgot commands it acknowledged to us: its log was rolled
                        # back (a host restoring an old database). Never follow it there.
                        raise IntegrityError(
                            f"{instance_id}: the enclave asks for counter {wanted}, but counter "
                            f"{self.counters.last(instance_id, account)} was already accepted: "
                            "its log was rolled back"
                        )
                    if wanted is not None and resync < _COUNTER_RESYNCS:
                        self.counters.record(instance_id, account, wanted - 1)
                        continue
                return opened
        raise CommandRefused(
            error_pb2.ECALL_ERROR_CODE_ABORTED, "could not agree on a counter with the enclave"
        )

    def query(
        self, instance_id: str, call: apps_pb2.AppCall, identity: Identity, *, suite: int = X25519_SUITE
    ) -> Opened:
        """Run one read-only call (no counter, nothing logged) and return its verified answer."""
        for attempt in range(2):
            attestation = self.attest(instance_id, refresh=attempt > 0)
            sealed = seal_command(
                attestation.keys,
                instance_id=instance_id,
                scheme=self._scheme(attestation, instance_id),
                identity=identity,
                call=call,
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
                return open_outcome(sealed, reply.outcome, attestation.keys.signing_public_key, query=True)
            except CommandRefused as refusal:
                if refusal.code != error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT or attempt > 0:
                    raise
        raise AssertionError("unreachable")

    def watch_receipts(
        self, instance_id: str, *, identity: Identity | None = None, replay_recent: bool = True
    ) -> ReceiptStream:
        """Stream the verified outcomes of this client's commands on `instance_id` as they commit."""
        request = gateway_pb2.WatchReceiptsRequest(
            instance_id=instance_id, request_id_prefix=self.session_prefix, replay_recent=replay_recent
        )
        call = self._stub.WatchReceipts(request, metadata=self._metadata(identity))

        def opener(item: gateway_pb2.WatchReceiptsResponse) -> Opened | None:
            with self._lock:
                pending = self._pending.get(item.request_id)
            if pending is None:
                return None  # another session of the same principal
            sealed, signing_key = pending
            return open_outcome(sealed, item.outcome, signing_key, query=False)

        return ReceiptStream(call, opener)

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
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    clock: Callable[[], float] = time.time,
) -> VeilClient:
    """Connect over TLS and verify the default shard's enclave; AttestationError if it does not pass.

    `ca` verifies the gateway's certificate (None: the system roots); `cert`/`key` present a
    client certificate (the admin's, for CreateInstance/ListInstances). `data_dir` resolves a
    "dev" root in the policy and keeps counters in `<data_dir>/counters.json`.
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
    client = VeilClient(
        channel,
        policy=policy,
        data_dir=data_dir,
        api_key=api_key,
        bearer=bearer,
        counters=counters,
        timeout=timeout,
        clock=clock,
    )
    try:
        client.attest()
    except BaseException:
        client.close()
        raise
    return client
