"""Every public RPC of the keyvault and the state service with random and mutated requests.

Real servers on port 0 over real mTLS (the state service with its own keyvault and an
in-process sim enclave), called as the identity each method's authorization table allows.
`rpc.check_rpc` states the rule: an expected status with ErrorInfo (never INTERNAL or UNKNOWN),
no state change on a refusal (keyvault: keys and commit heads, audit chain verifies; state:
instance heads and the enclave's state digest), and changes on success only where legitimate.
The service list is `mesh.SERVICE_TARGETS`: the gateway joins with one entry there.
"""

from __future__ import annotations

import random

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import given
from hypothesis import strategies as st

from tests.attack.mesh import SERVICE_TARGETS, Lab, ServiceTarget
from tests.attack.mutations import decodes_as, message_class
from tests.attack.profile import attack_settings
from tests.attack.rpc import call_raw, check_rpc, rpc_input

RPCS = [
    pytest.param(target, method, id=f"{target.name}.{method.name}")
    for target in SERVICE_TARGETS
    for method in target.methods
]


@pytest.mark.parametrize(("target", "method"), RPCS)
def test_every_seed_is_answered(lab: Lab, target: ServiceTarget, method: MethodDescriptor) -> None:
    # The seeds are valid requests whose replay is idempotent or refused: the mutations below
    # start from inputs that reach deep into each handler.
    running = lab.get(target)
    assert running.seeds[method.name], f"no seed for {method.full_name}"
    for seed in running.seeds[method.name]:
        check_rpc(running, method, seed.SerializeToString())


@pytest.mark.parametrize(("target", "method"), RPCS)
@attack_settings(80)
@given(rng=st.randoms(use_true_random=True))
def test_random_and_mutated_requests_get_an_expected_status_and_change_nothing(
    lab: Lab, target: ServiceTarget, method: MethodDescriptor, rng: random.Random
) -> None:
    running = lab.get(target)
    check_rpc(running, method, rpc_input(rng, running, method))


UNDECODABLE = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0f\x00"]  # endless varint, short field, wire type 7


@pytest.mark.parametrize("target", SERVICE_TARGETS, ids=lambda t: t.name)
def test_undecodable_requests_are_invalid_argument(lab: Lab, target: ServiceTarget) -> None:
    running = lab.get(target)
    before = running.snapshot()
    codes = set()
    for method in target.methods:
        for payload in UNDECODABLE:
            assert not decodes_as(payload, message_class(method.input_type))
            with pytest.raises(grpc.RpcError) as refused:
                call_raw(running, method, payload)
            codes.add(refused.value.code())
    assert running.snapshot() == before
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}, codes
