"""Instance leases at the served keyvault (mTLS): who may take and read them, what a caller sees
when it is refused (FAILED_PRECONDITION with an ErrorInfo reason), and hostile arguments."""

from __future__ import annotations

import functools

import grpc
import pytest

from tests.conftest import refused
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc

from .support import Stubs


def _acquire(
    stub: keyvault_pb2_grpc.KeyvaultServiceStub,
    holder: str,
    token: int = 0,
    *,
    instance: str = "coins",
    ttl: int = 5000,
) -> keyvault_pb2.Lease:
    request = keyvault_pb2.AcquireLeaseRequest(
        instance_id=instance, holder=holder, ttl_ms=ttl, fencing_token=token
    )
    return stub.AcquireLease(request, timeout=10).lease


def test_only_the_state_identity_takes_leases_and_the_mesh_reads_them(stub: Stubs) -> None:
    state = stub("state")
    lease = _acquire(state, "node-a")
    assert (lease.holder, lease.fencing_token) == ("node-a", 1)
    for other in ("gateway", "admin"):
        code, _ = refused(functools.partial(_acquire, stub(other), "node-x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        listed = stub(other).ListLeases(keyvault_pb2.ListLeasesRequest(), timeout=10).leases
        assert [(item.instance_id, item.holder, item.fencing_token) for item in listed] == [
            ("coins", "node-a", 1)
        ]


def test_refusals_carry_their_reason(stub: Stubs) -> None:
    state = stub("state")
    _acquire(state, "node-a")
    assert refused(functools.partial(_acquire, state, "node-b")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_HELD",
    )
    # A renewal with a token the keyvault did not give, or under another holder's name.
    assert refused(functools.partial(_acquire, state, "node-a", 2)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
    )
    assert refused(functools.partial(_acquire, state, "node-b", 1)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
    )


@pytest.mark.parametrize(
    ("instance", "holder", "ttl"),
    [
        ("", "node-a", 5000),
        ("x" * 300, "node-a", 5000),
        ("co\x00ins", "node-a", 5000),  # PostgreSQL refuses a NUL in text: it was UNAVAILABLE
        ("coins\n", "node-a", 5000),
        ("Coins", "node-a", 5000),
        ("coins", "", 5000),
        ("coins", "a\nb", 5000),
        ("coins", "h" * 200, 5000),
        ("coins", "node-a", 0),
        ("coins", "node-a", 10**9),
    ],
)
def test_hostile_arguments_are_invalid_not_internal(
    stub: Stubs, instance: str, holder: str, ttl: int
) -> None:
    call = functools.partial(_acquire, stub("state"), holder, instance=instance, ttl=ttl)
    assert refused(call)[0] == grpc.StatusCode.INVALID_ARGUMENT
