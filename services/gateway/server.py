"""Gateway server: Veil's public gRPC API in front of the state shards.

Per request, in order: per-method authorization by client certificate (optional on the public
port; admin only for CreateInstance/ListInstances), size limit and parsing (an oversize request
is RESOURCE_EXHAUSTED, an undecodable one INVALID_ARGUMENT: veil.services.common.decoding),
the instance's authentication plugin, the caller's rate limit, shape checks, then routing to the
instance's state replica with the caller's remaining deadline. Mutations are deduplicated by
request_id in front of the state service's own durable dedupe (veil.services.gateway.idempotency).

ExecuteBatch runs each of its commands through Execute's steps (plugin, one rate-limit token,
shape checks, request_id dedupe, routing and its fall-backs), concurrently; the commands that
go upstream are handed to each replica's coalescer as one ordered group
(veil.services.gateway.upstream), so an account's consecutive counters arrive in order.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from veil.enclave import wire
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common import identity
from veil.services.common.channels import call, remaining_timeout, secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VeilError,
    internal_status,
    new_correlation_id,
)
from veil.services.common.identity import AUTHENTICATED, PUBLIC, certificate_identity
from veil.services.common.main import serve
from veil.services.common.server import HostedService, VeilServer
from veil.services.gateway import public_errors, validation
from veil.services.gateway.auth import ANONYMOUS, Authenticators, Credentials, Principal, load_authenticators
from veil.services.gateway.config import GATEWAY_WORKERS, GatewayConfig
from veil.services.gateway.idempotency import Deduplicator, Key, scoped_request_id
from veil.services.gateway.ratelimit import RateLimiter, refusal_counter
from veil.services.gateway.receipts import MAX_PREFIX, MIN_PREFIX, Committed, ReceiptHub, TooManySubscribers
from veil.services.gateway.routing import Placement, ShardRouter
from veil.services.gateway.streams import StreamLimits, StreamSlots
from veil.services.gateway.upstream import MAX_BATCH, Answer, coalescing_stub, forward, translate
from veil.state.v1 import state_pb2, state_pb2_grpc

_log = logging.getLogger(__name__)

_Reply = TypeVar("_Reply")

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
SERVICE_NAME = SERVICE.full_name

AUTHORIZATION = identity.method_names(
    SERVICE_NAME,
    {
        # Anyone may try these; the instance's authentication plugin decides.
        "GetAttestation": PUBLIC,
        "Execute": PUBLIC,
        "Query": PUBLIC,
        "WatchReceipts": PUBLIC,
        "CreateInstance": frozenset({identity.ADMIN}),
        "ListInstances": frozenset({identity.ADMIN}),
        "GetStatus": AUTHENTICATED,
        "Ping": PUBLIC,
        "ExecuteBatch": PUBLIC,
    },
)
HOSTED_SERVICE = HostedService(
    SERVICE_NAME, AUTHORIZATION, gateway_pb2_grpc.add_GatewayServiceServicer_to_server
)
#: Commands one public ExecuteBatch may carry: one coalesced message to a replica at most.
MAX_BATCH_COMMANDS = MAX_BATCH
#: How long a gateway asks the keyvault where an instance moved after its replica hung.
LEASE_LOOKUP_TIMEOUT_S = 2.0
_JWKS_TTL_S = 60.0


def _peer_host(context: grpc.ServicerContext) -> str:
    peer = context.peer()  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"
    return peer.rsplit(":", 1)[0] if ":" in peer else peer


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}


def _gateway_instance(instance: state_pb2.Instance, shard: str) -> gateway_pb2.Instance:
    return gateway_pb2.Instance(
        instance_id=instance.instance_id, config=instance.config, sequence=instance.head.sequence, shard=shard
    )


@dataclass(frozen=True)
class _Batched:
    """One command of an ExecuteBatch that this call sends upstream (it leads its request_id)."""

    instance_id: str
    request_id: str
    principal: Principal
    key: Key
    forwarded: state_pb2.ExecuteRequest
    answer: futures.Future[gateway_pb2.ExecuteResponse]


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API."""

    def __init__(
        self,
        *,
        router: ShardRouter,
        shards: dict[str, state_pb2_grpc.StateServiceStub],
        keyvault: keyvault_pb2_grpc.KeyvaultServiceStub | None,
        authenticators: Authenticators,
        limiter: RateLimiter,
        upstream_timeout: float,
        hub: ReceiptHub | None = None,
        stream_limits: StreamLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._shards = shards
        self._keyvault = keyvault
        self._authenticators = authenticators
        self._limiter = limiter
        self._timeout = upstream_timeout
        self.hub = hub or ReceiptHub()
        self.streams = StreamSlots(stream_limits or StreamLimits())
        self._clock = clock
        self._executions: Deduplicator[gateway_pb2.ExecuteResponse] = Deduplicator()
        self._creations: Deduplicator[gateway_pb2.CreateInstanceResponse] = Deduplicator()
        self._jwks_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._jwks: tuple[float, str] | None = None
        self._fanout = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-fanout")
        # Batched commands whose first attempt failed finish here, as Execute would (routing's
        # fall-backs may list every shard on _fanout: a pool of their own never waits on itself).
        self._retries = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="gateway-batch-retry")

    def close(self) -> None:
        """Release the fan-out pool and end receipt streams."""
        self.hub.close()
        self._fanout.shutdown(wait=False, cancel_futures=True)
        self._retries.shutdown(wait=False, cancel_futures=True)

    # --- admission ---------------------------------------------------------------------------

    def _admit(
        self,
        instance_id: str,
        context: grpc.ServicerContext,
        verdicts: dict[str, Principal | VeilError] | None = None,
    ) -> Principal:
        """Authenticate with the instance's plugin and take a rate-limit token; returns the principal.

        `verdicts` (one ExecuteBatch call, whose credentials are the same for every command)
        keeps the plugin's verdict per instance id: the plugin runs once per instance per call,
        however many commands name it, while every command still takes its own token. An empty
        bucket therefore costs a batch one plugin run at most, never one per command.
        """
        verdict = verdicts.get(instance_id) if verdicts is not None else None
        if verdict is None:
            credentials = Credentials(certificate_identity(context), _metadata(context))
            try:
                verdict = self._authenticators.authenticate(instance_id, credentials)
            except VeilError as exc:
                verdict = exc
            except BaseException:
                self._limiter.acquire(f"peer:{_peer_host(context)}")  # charged whatever it raised
                raise
            if verdicts is not None:
                verdicts[instance_id] = verdict
        # Every attempt is charged, whatever the plugin said: a refused one to the address.
        # (The address is asked of gRPC only when it is the key: a named principal's is its own.)
        if isinstance(verdict, Principal) and verdict != ANONYMOUS:
            client = verdict.key
        else:
            client = f"peer:{_peer_host(context)}"
        self._limiter.acquire(client)
        if isinstance(verdict, VeilError):
            raise verdict
        return verdict

    # --- routing -----------------------------------------------------------------------------

    def _stub(self, shard: str) -> state_pb2_grpc.StateServiceStub:
        return self._shards[shard]

    def _list_all(self, timeout: float, *, name_failed_shard: bool = False) -> list[gateway_pb2.Instance]:
        """Fan ListInstances out to every shard in parallel; the complete listing replaces the directory.

        A replica that fails makes the whole listing UNAVAILABLE (a partial one would mislead);
        only admin callers learn which replica it was.
        """

        def list_one(shard: str) -> list[gateway_pb2.Instance]:
            reply = forward(
                shard, self._stub(shard).ListInstances, state_pb2.ListInstancesRequest(), timeout=timeout
            )
            return [_gateway_instance(i, shard) for i in reply.instances]

        jobs = {shard: self._fanout.submit(list_one, shard) for shard in self._router.shards}
        instances: list[gateway_pb2.Instance] = []
        for shard, job in jobs.items():
            metadata = {"shard": shard} if name_failed_shard else None
            try:
                instances.extend(job.result(timeout=timeout + 1))
            except futures.TimeoutError:
                raise Unavailable(
                    "a state replica did not answer in time",
                    reason="SHARD_UNAVAILABLE",
                    metadata=metadata,
                    internal=True,
                ) from None
            except Unavailable as exc:
                raise Unavailable(exc.message, reason=exc.reason, metadata=metadata, internal=True) from None
        self._router.replace(Placement(i.instance_id, i.shard, i.config) for i in instances)
        return instances

    def _locate(self, instance_id: str, timeout: float) -> Placement:
        """The instance's placement; refreshes the directory once (rate bounded) before NOT_FOUND."""
        known = self._router.known(instance_id)
        if known is None:
            # One refresh at a time, and a lookup waits for the one in flight: checking the
            # rate bound alone answered NOT_FOUND for an existing instance to every lookup that
            # arrived during a refresh (all of them, on a restarted gateway).
            if not self._refresh_lock.acquire(timeout=timeout):
                raise DeadlineExceeded("the instance directory is being refreshed", reason="DIRECTORY_BUSY")
            try:
                known = self._router.known(instance_id)
                if known is None and self._router.refresh_due():
                    self._list_all(timeout)
                    known = self._router.known(instance_id)
            finally:
                self._refresh_lock.release()
        if known is None:
            raise NotFound(f"instance {instance_id!r} not found", metadata={"instance_id": instance_id})
        return known

    def _routed(self, instance_id: str, timeout: float, send: Callable[[str], _Reply]) -> _Reply:
        """Send to the instance's shard; on NOT_FOUND look for it on the others once."""
        shard = self._router.route(instance_id)
        try:
            return send(shard)
        except NotFound:
            if len(self._router.shards) == 1:
                raise
            # Moved by a take-over since the directory was filled: its lease names the host.
            owner = self._lease_holder(instance_id, timeout)
            if owner is not None and owner != shard:
                return send(owner)
            if not self._router.refresh_due():
                raise
            self._list_all(timeout)
            known = self._router.known(instance_id)
            if known is None or known.shard == shard:
                raise
            return send(known.shard)
        except Unavailable:
            # The replica is unreachable: if another host took the instance over (its lease at
            # the keyvault names that host), go there; otherwise the caller retries.
            owner = self._lease_holder(instance_id, timeout)
            if owner is None or owner == shard:
                raise
            return send(owner)
        except DeadlineExceeded:
            # A replica that hangs (paused, cut off) used up this call's time: learn where the
            # instance is served now, so that the caller's retry goes there.
            self._lease_holder(instance_id, LEASE_LOOKUP_TIMEOUT_S)
            raise

    def _lease_holder(self, instance_id: str, timeout: float) -> str | None:
        """The state replica the keyvault's lease says serves the instance (its holder is that
        replica's address), learned into the directory; None when unknown or not a replica."""
        if self._keyvault is None:
            return None
        try:
            reply = forward(
                "keyvault",
                self._keyvault.ListLeases,
                keyvault_pb2.ListLeasesRequest(instance_ids=[instance_id]),  # that lease only, not the table
                timeout=timeout,
            )
        except VeilError:
            return None
        holder = next((lease.holder for lease in reply.leases if lease.instance_id == instance_id), None)
        if holder is None or holder not in self._router.shards:
            return None
        known = self._router.known(instance_id)
        if known is not None:
            self._router.learn(Placement(instance_id, holder, known.config))
        return holder

    def _send(
        self,
        instance_id: str,
        timeout: float,
        rpc: Callable[[state_pb2_grpc.StateServiceStub], Callable[..., _Reply]],
        request: object,
    ) -> _Reply:
        """Call `rpc` of the instance's state replica with `request` (see `_routed`)."""
        return self._routed(
            instance_id,
            timeout,
            lambda shard: forward(shard, rpc(self._stub(shard)), request, timeout=timeout),
        )

    # --- public methods ----------------------------------------------------------------------

    def GetAttestation(
        self, request: gateway_pb2.GetAttestationRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetAttestationResponse:
        instance_id = validation.instance_id(request.instance_id, required=False)
        self._admit(instance_id, context)
        timeout = remaining_timeout(context, self._timeout)
        placement = self._locate(instance_id, timeout) if instance_id else None
        shard = placement.shard if placement else self._router.default_shard
        request_ = state_pb2.GetAttestationRequest(instance_id=instance_id)
        if placement is None:
            reply = forward(shard, self._stub(shard).GetAttestation, request_, timeout=timeout)
        else:  # where the instance is served, even when its host was lost (see _routed)
            reply = self._routed(
                instance_id,
                timeout,
                lambda at: forward(at, self._stub(at).GetAttestation, request_, timeout=timeout),
            )
            placement = self._router.known(instance_id) or placement
        response = reply.bundle  # the state host's evidence, passed on as it is
        for unset_by_state in ("instance", "descriptor"):
            response.ClearField(unset_by_state)
        if not response.jwks_json:
            response.jwks_json = self._keyvault_jwks(timeout)
        if reply.HasField("descriptor"):
            response.descriptor.CopyFrom(reply.descriptor)
        if placement is not None:
            response.instance.CopyFrom(
                gateway_pb2.Instance(instance_id=instance_id, config=placement.config, shard=placement.shard)
            )
        return response

    def _keyvault_jwks(self, timeout: float) -> str:
        """The keyvault's JWKS (cached briefly), for bundles that do not carry one."""
        with self._jwks_lock:
            if self._jwks is not None and time.monotonic() - self._jwks[0] < _JWKS_TTL_S:
                return self._jwks[1]
        unavailable = Unavailable("the keyvault's JWKS is unavailable", reason="JWKS_UNAVAILABLE")
        if self._keyvault is None:
            raise unavailable
        try:
            reply = forward(
                "keyvault", self._keyvault.GetJwks, keyvault_pb2.GetJwksRequest(), timeout=timeout
            )
            json.loads(reply.jwks_json)  # refuse to pass on garbage
        except (VeilError, ValueError):
            raise unavailable from None
        with self._jwks_lock:
            self._jwks = (time.monotonic(), reply.jwks_json)
        return reply.jwks_json

    def Execute(
        self, request: gateway_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ExecuteResponse:
        instance_id = validation.instance_id(request.instance_id)
        principal = self._admit(instance_id, context)
        request_id = validation.request_id(request.request_id)
        command = validation.sealed_command(request.command)
        timeout = remaining_timeout(context, self._timeout)
        scoped = scoped_request_id(principal.kind, principal.key, request_id)  # not another tenant's
        key = (instance_id, scoped, wire.command_hash(command.encapsulated_key, command.ciphertext))
        forwarded = state_pb2.ExecuteRequest(instance_id=instance_id, command=command, request_id=scoped)

        def execute() -> gateway_pb2.ExecuteResponse:
            reply = self._send(instance_id, timeout, lambda stub: stub.Execute, forwarded)
            if reply.outcome.accepted:
                self.hub.publish(Committed(instance_id, request_id, principal.key, reply.outcome))
            return gateway_pb2.ExecuteResponse(outcome=reply.outcome)

        return _once(self._executions, key, execute, timeout)

    def ExecuteBatch(
        self, request: gateway_pb2.ExecuteBatchRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.ExecuteBatchResponse]:
        # Admission and hand-over happen here, before the stream starts (a refusal of the whole
        # call is its status at once, as for WatchReceipts); the answers stream from _batch_stream.
        if not 0 < len(request.commands) <= MAX_BATCH_COMMANDS:
            raise InvalidArgument(
                f"a batch carries 1 to {MAX_BATCH_COMMANDS} commands", metadata={"field": "commands"}
            )
        timeout = remaining_timeout(context, self._timeout)
        deadline = time.monotonic() + timeout
        refused: list[gateway_pb2.ExecuteBatchResponse] = []
        answers: dict[futures.Future[gateway_pb2.ExecuteResponse], list[int]] = {}
        upstream: dict[str, list[_Batched]] = {}  # per replica, in the batch's order
        verdicts: dict[str, Principal | VeilError] = {}  # the plugin's, once per instance id
        for index, command in enumerate(request.commands):
            try:  # Execute's admission, one command at a time: each is authenticated and charged
                instance_id = validation.instance_id(command.instance_id)
                principal = self._admit(instance_id, context, verdicts)
                request_id = validation.request_id(command.request_id)
                sealed = validation.sealed_command(command.command)
            except VeilError as exc:
                refused.append(_batch_failure(index, exc, context))
                continue
            scoped = scoped_request_id(principal.kind, principal.key, request_id)
            key = (instance_id, scoped, wire.command_hash(sealed.encapsulated_key, sealed.ciphertext))
            answer, leader = self._executions.begin(key)
            answers.setdefault(answer, []).append(index)  # a repeated request shares its answer
            if leader:
                forwarded = state_pb2.ExecuteRequest(
                    instance_id=instance_id, command=sealed, request_id=scoped
                )
                batched = _Batched(instance_id, request_id, principal, key, forwarded, answer)
                upstream.setdefault(self._router.route(instance_id), []).append(batched)
        for shard, group in upstream.items():
            self._send_group(shard, group, deadline)
        return _batch_stream(refused, answers, deadline, context)

    def _send_group(self, shard: str, group: list[_Batched], deadline: float) -> None:
        """Hand a replica's commands of one batch to its coalescer as one ordered group; each
        answer settles its request (a failure is retried off the reader thread as Execute would)."""
        submit = getattr(self._stub(shard).Execute, "submit_group", None)
        if submit is None:  # a plain stub (tests): one after another, in order, off this thread

            def one_by_one() -> None:
                for batched in group:
                    self._retry_batched(shard, batched, None, deadline)

            self._retries.submit(one_by_one)
            return
        sent = submit([b.forwarded for b in group], timeout=max(deadline - time.monotonic(), 0.001))
        for batched, answer in zip(group, sent, strict=True):
            answer.add_done_callback(functools.partial(self._landed, shard, batched, deadline))

    def _landed(
        self,
        shard: str,
        batched: _Batched,
        deadline: float,
        answer: Answer,
    ) -> None:
        error = answer.exception()
        if error is None:
            self._settle(batched, answer.result())
        else:  # routing's fall-backs may wait (lease look-up, another replica): not on this thread
            self._retries.submit(self._retry_batched, shard, batched, error, deadline)

    def _retry_batched(
        self, shard: str, batched: _Batched, error: BaseException | None, deadline: float
    ) -> None:
        """Finish a batched command as Execute's `_send` would, its first attempt's `error` included."""
        first = [error] if error is not None else []
        timeout = max(deadline - time.monotonic(), 0.001)

        def send(at: str) -> state_pb2.ExecuteResponse:
            if first and at == shard:
                failed = first.pop()
                if not isinstance(failed, grpc.RpcError):
                    raise failed
                if failed.code() != grpc.StatusCode.UNAVAILABLE:
                    raise translate(failed, at)
                # UNAVAILABLE: sent again as a plain call, as `forward` retries a unary one.
            return forward(at, self._stub(at).Execute, batched.forwarded, timeout=timeout)

        try:
            reply = self._routed(batched.instance_id, timeout, send)
        except BaseException as exc:  # it becomes this command's status
            self._executions.fail(batched.key, batched.answer, exc)
            return
        self._settle(batched, reply)

    def _settle(self, batched: _Batched, reply: state_pb2.ExecuteResponse) -> None:
        outcome = reply.outcome
        if outcome.accepted:
            principal = batched.principal.key
            self.hub.publish(Committed(batched.instance_id, batched.request_id, principal, outcome))
        self._executions.finish(batched.key, batched.answer, gateway_pb2.ExecuteResponse(outcome=outcome))

    def Query(
        self, request: gateway_pb2.QueryRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.QueryResponse:
        instance_id = validation.instance_id(request.instance_id)
        self._admit(instance_id, context)
        command = validation.sealed_command(request.command)
        timeout = remaining_timeout(context, self._timeout)
        forwarded = state_pb2.QueryRequest(instance_id=instance_id, command=command)
        reply = self._send(instance_id, timeout, lambda stub: stub.Query, forwarded)
        return gateway_pb2.QueryResponse(outcome=reply.outcome)

    def CreateInstance(
        self, request: gateway_pb2.CreateInstanceRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.CreateInstanceResponse:
        instance_id = validation.instance_id(request.instance_id)
        request_id = validation.request_id(request.request_id)
        if not request.HasField("config"):
            raise InvalidArgument("config is required", metadata={"field": "config"})
        self._limiter.acquire(f"certificate:{certificate_identity(context)}")
        timeout = remaining_timeout(context, self._timeout)
        shard = self._router.route(instance_id)
        forwarded = state_pb2.CreateInstanceRequest(
            instance_id=instance_id, config=request.config, request_id=request_id
        )
        key = (instance_id, request_id, request.config.SerializeToString(deterministic=True))

        def create() -> gateway_pb2.CreateInstanceResponse:
            reply = forward(shard, self._stub(shard).CreateInstance, forwarded, timeout=timeout)
            created = reply.instance
            self._router.learn(Placement(created.instance_id, shard, created.config))
            return gateway_pb2.CreateInstanceResponse(
                instance=_gateway_instance(created, shard), descriptor=reply.descriptor
            )

        return _once(self._creations, key, create, timeout)

    def ListInstances(
        self, request: gateway_pb2.ListInstancesRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListInstancesResponse:
        instances = self._list_all(remaining_timeout(context, self._timeout), name_failed_shard=True)
        instances.sort(key=lambda i: i.instance_id)
        return gateway_pb2.ListInstancesResponse(instances=instances)

    def WatchReceipts(
        self, request: gateway_pb2.WatchReceiptsRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.WatchReceiptsResponse]:
        # Admission happens here, before the stream starts: a refusal is the call's status at
        # once (raised while iterating, gRPC sometimes reported a refusal as CANCELLED).
        instance_id = validation.instance_id(request.instance_id)
        principal = self._admit(instance_id, context)
        prefix = request.request_id_prefix
        if not MIN_PREFIX <= len(prefix) <= MAX_PREFIX or not prefix.isprintable():
            raise InvalidArgument(
                f"request_id_prefix must be {MIN_PREFIX} to {MAX_PREFIX} printable characters",
                metadata={"field": "request_id_prefix"},
            )
        self._locate(instance_id, remaining_timeout(context, self._timeout))
        # A stream holds a worker thread for its whole life: capped per caller and in all,
        # and ended after a lifetime (see veil.services.gateway.streams).
        owner = None if principal == ANONYMOUS else principal.key
        release = self.streams.acquire(_peer_host(context), owner)
        if not context.add_callback(release):  # the call ended already
            release()
        try:
            stream = self.hub.subscribe(instance_id, prefix, principal.key, replay=request.replay_recent)
        except BaseException:
            release()
            raise
        return self._stream(stream, context, release)

    def _stream(
        self, stream: Iterator[Committed | None], context: grpc.ServicerContext, release: Callable[[], None]
    ) -> Iterator[gateway_pb2.WatchReceiptsResponse]:
        lifetime = self.streams.limits.lifetime
        ends = self._clock() + lifetime
        try:
            for item in stream:
                if not context.is_active():
                    return
                if item is not None:
                    yield gateway_pb2.WatchReceiptsResponse(request_id=item.request_id, outcome=item.outcome)
                if self._clock() >= ends:
                    raise Unavailable(
                        f"receipt streams last at most {lifetime:g} s; subscribe again "
                        "(with replay_recent to receive what committed meanwhile)",
                        reason="STREAM_LIFETIME_REACHED",
                        metadata={"lifetime_s": f"{lifetime:g}"},
                    )
        except TooManySubscribers:
            raise ResourceExhausted("too many receipt subscribers", reason="TOO_MANY_SUBSCRIBERS") from None
        finally:
            release()

    def GetStatus(
        self, request: gateway_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetStatusResponse:
        statuses = []
        for address, stub in self._shards.items():
            try:
                reply = call(
                    stub.GetStatus, state_pb2.GetStatusRequest(), timeout=remaining_timeout(context, 5.0)
                )
            except grpc.RpcError:
                statuses.append(gateway_pb2.ShardStatus(address=address, serving=False))
                continue
            # The counters let a client (`veil bench`) compute ECALLs per command and commands
            # per commit without the gateway identity the state service requires.
            statuses.append(
                gateway_pb2.ShardStatus(
                    address=address,
                    serving=reply.step == state_pb2.LIFECYCLE_STEP_SERVING,
                    ecalls=reply.ecalls,
                    commands=reply.commands,
                    commits=reply.commits,
                    holds_released_by_keyvault=reply.holds_released_by_keyvault,
                    holds_released_by_enclave=reply.holds_released_by_enclave,
                )
            )
        all_serving = all(s.serving for s in statuses)
        detail = "all shards serving" if all_serving else "some shards are not serving"
        return gateway_pb2.GetStatusResponse(serving=all_serving, detail=detail, shards=statuses)

    def Ping(
        self, request: gateway_pb2.PingRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.PingResponse:
        # The transport baseline: Execute's admission, routing and deadline, then the state
        # host's Ping (no enclave, no storage), so the difference to Execute is the enclave's work.
        instance_id = validation.instance_id(request.instance_id)
        self._admit(instance_id, context)
        timeout = remaining_timeout(context, self._timeout)
        forwarded = state_pb2.PingRequest(payload=request.payload)
        reply = self._send(instance_id, timeout, lambda stub: stub.Ping, forwarded)
        return gateway_pb2.PingResponse(payload=reply.payload)


def _once(dedupe: Deduplicator[_Reply], key: Key, work: Callable[[], _Reply], timeout: float) -> _Reply:
    """Run `work` once for identical requests; one that waited out its twin in flight for its
    whole deadline is DEADLINE_EXCEEDED."""
    try:
        return dedupe.run(key, work, wait=timeout)
    except futures.TimeoutError:
        raise DeadlineExceeded(
            "an identical request is still in flight", reason="REQUEST_IN_FLIGHT"
        ) from None


def _batch_stream(
    refused: list[gateway_pb2.ExecuteBatchResponse],
    answers: dict[futures.Future[gateway_pb2.ExecuteResponse], list[int]],
    deadline: float,
    context: grpc.ServicerContext,
) -> Iterator[gateway_pb2.ExecuteBatchResponse]:
    """The batch's answers: the refused commands', then each as soon as it is ready."""
    yield from refused
    try:
        for done in futures.as_completed(list(answers), max(deadline - time.monotonic(), 0.0)):
            for index in answers.pop(done):
                yield _batch_answer(index, done, context)
    except futures.TimeoutError:
        late = DeadlineExceeded(
            "the command was not committed within the deadline; retry with the same request_id",
            reason="DEADLINE_EXCEEDED",
        )
        for indexes in answers.values():  # they may still commit: a retry finds out
            yield from (_batch_failure(index, late, context) for index in indexes)


def _batch_answer(
    index: int, done: futures.Future[gateway_pb2.ExecuteResponse], context: grpc.ServicerContext
) -> gateway_pb2.ExecuteBatchResponse:
    error = done.exception()
    if error is None:
        return gateway_pb2.ExecuteBatchResponse(index=index, response=done.result())
    return _batch_failure(index, error, context)


def _batch_failure(
    index: int, error: BaseException, context: grpc.ServicerContext
) -> gateway_pb2.ExecuteBatchResponse:
    """The status Execute would have ended with, as the error interceptor would present it."""
    if isinstance(error, VeilError):
        status = public_errors.present(error, context).to_status()
    else:
        correlation_id = new_correlation_id()
        _log.error("a batched command failed (correlation id %s)", correlation_id, exc_info=error)
        status = internal_status(correlation_id)
    return gateway_pb2.ExecuteBatchResponse(index=index, status=status.SerializeToString())


def create_server(
    config: ServiceConfig,
    *,
    gateway: GatewayConfig | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> tuple[VeilServer, int]:
    """Build the gateway server (not started); returns it and its bound port."""
    gateway = gateway or GatewayConfig.from_env()
    authenticators = load_authenticators(gateway.auth_file)
    channels = {
        address: secure_channel(address, config.tls, tracer_provider) for address in gateway.state_addresses
    }
    keyvault_channel = secure_channel(gateway.keyvault_address, config.tls, tracer_provider)
    servicer = GatewayServicer(
        router=ShardRouter(gateway.state_addresses, gateway.shard_map),
        shards={a: coalescing_stub(c) for a, c in channels.items()},
        keyvault=keyvault_pb2_grpc.KeyvaultServiceStub(keyvault_channel),
        authenticators=authenticators,
        limiter=RateLimiter(
            gateway.rate_per_second,
            gateway.burst,
            on_refused=refusal_counter(meter_provider) if meter_provider is not None else None,
        ),
        upstream_timeout=gateway.upstream_timeout,
        stream_limits=gateway.stream_limits,
    )
    server = HOSTED_SERVICE.build_server(
        config,
        servicer,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        max_request_bytes=gateway.max_message_bytes,
        public_listen=gateway.public_listen or None,
        # A handler mostly waits for its state replica (an Execute for its batch's commit):
        # with too few threads, waiting handlers cap the requests in flight, and so the
        # state's batches, below the number of clients.
        max_workers=GATEWAY_WORKERS,
        # Beyond this many calls in flight (running or queued for a thread), new ones are
        # refused RESOURCE_EXHAUSTED at once instead of queueing past their deadlines.
        maximum_concurrent_rpcs=gateway.max_concurrent_rpcs,
        present_error=public_errors.present,
    )
    server.on_stop.append(servicer.close)
    server.on_stop.extend(channel.close for channel in (*channels.values(), keyvault_channel))
    server.set_serving(True)
    return server, server.port


def main() -> int:
    return serve("gateway", create_server)
