"""RPC attacks: random and mutated requests to every method of a running service, and the verdict.

Requests travel as raw bytes over the service's real mTLS port, presented by the identity the
authorization table allows (so they reach the handler). The verdict (`check_rpc`):

* a refusal has a status in `EXPECTED_REFUSALS` (never INTERNAL, UNKNOWN, UNAVAILABLE or
  DATA_LOSS) with a `google.rpc.ErrorInfo` in the veil.dev domain, and changes nothing;
* a success decodes as the method's response type and changes state only where the service
  says such a success may (`Running.may_change`);
* the service-wide invariants hold either way (`Running.check_invariants`: e.g. the keyvault's
  audit chain verifies and a refusal appends only "refused" events; the state service stays
  SERVING).
"""

from __future__ import annotations

import random

import grpc
from google.protobuf.descriptor import MethodDescriptor

from tests.attack.mesh import EXPECTED_REFUSALS, TIMEOUT, Running
from tests.attack.mutations import decodes_as, message_class, mutate, mutate_message, random_message
from veil.status import ERROR_DOMAIN, error_info


def method_of(running: Running, name: str) -> MethodDescriptor:
    return running.target.service.methods_by_name[name]


def call_raw(
    running: Running, method: MethodDescriptor, payload: bytes, identity: str | None = None
) -> bytes:
    """Send `payload` as the request bytes of `method`; returns the response bytes (or raises)."""
    channel = running.channel(identity or running.target.caller(method.name))
    path = running.target.path(method.name)
    if method.server_streaming:
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        responses = stream(payload, timeout=TIMEOUT)
        first = b""
        for item in responses:  # one item is enough to judge; then hang up
            first = item
            responses.cancel()
            break
        return first
    unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return unary(payload, timeout=TIMEOUT)


def rpc_input(rng: random.Random, running: Running, method: MethodDescriptor) -> bytes:
    """A random request, a seed with one field changed, or a byte-mutated seed that still decodes.

    Undecodable bytes are left to `test_rpc_fuzz.test_undecodable_requests_...`: the gRPC
    runtime, not our code, answers them.
    """
    request_type = message_class(method.input_type)
    seeds = running.seeds[method.name]
    kind = rng.randrange(4)
    if kind == 0:
        return random_message(rng, method.input_type).SerializeToString()
    seed = rng.choice(seeds)
    if kind == 3:
        donors = [s.SerializeToString() for ss in running.seeds.values() for s in ss]
        raw = mutate(rng, seed.SerializeToString(), donors)
        if decodes_as(raw, request_type):
            return raw
    mutated = mutate_message(rng, seed)
    if kind == 2:
        mutated = mutate_message(rng, mutated)
    return mutated.SerializeToString()


def check_rpc(running: Running, method: MethodDescriptor, payload: bytes) -> str:
    """Send one request and judge the answer (see the module docstring); returns a label."""
    path = running.target.path(method.name)
    before = running.snapshot()
    try:
        response = call_raw(running, method, payload)
    except grpc.RpcError as error:
        refused: grpc.RpcError | None = error
    else:
        refused = None
    if refused is not None:
        code = refused.code()
        assert code in EXPECTED_REFUSALS, f"{path}: {code.name}: {refused.details()}"
        info = error_info(refused)
        assert info is not None, f"{path}: {code.name} without ErrorInfo: {refused.details()}"
        assert info.reason, f"{path}: {code.name} with an empty ErrorInfo reason"
        assert info.domain == ERROR_DOMAIN, f"{path}: ErrorInfo of domain {info.domain!r}"
        running.check_invariants(refused=True)
        assert running.snapshot() == before, f"{path}: refused with {code.name} but the state changed"
        return f"{method.name}:{code.name}"
    message_class(method.output_type).FromString(response)
    running.check_invariants(refused=False)
    if running.snapshot() != before:
        assert running.may_change(method.name, response), f"{path}: succeeded and changed the state"
        return f"{method.name}:OK-changed"
    return f"{method.name}:OK"
