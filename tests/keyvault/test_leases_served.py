"""Instance leases at the served keyvault (mTLS): who may take and read them, what a caller sees
when it is refused (FAILED_PRECONDITION with an ErrorInfo reason), and hostile arguments."""

from __future__ import annotations

import functools

import grpc
import pytest

from tests.conftest import refused
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.keyvault.leases import MAX_HOLDER_BYTES, MAX_PAGE_SIZE, Lease
from veil.services.keyvault.service import lease_message

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


def test_one_answer_is_bounded_and_one_instance_is_asked_for_by_id(stub: Stubs) -> None:
    state, gateway = stub("state"), stub("gateway")
    for instance in ("a-1", "b-2", "c-3"):
        _acquire(state, "node-a", instance=instance)
    asked = gateway.ListLeases(keyvault_pb2.ListLeasesRequest(instance_ids=["b-2", "z-9"]), timeout=10)
    assert [lease.instance_id for lease in asked.leases] == ["b-2"]
    first = gateway.ListLeases(keyvault_pb2.ListLeasesRequest(page_size=2), timeout=10)
    rest = gateway.ListLeases(keyvault_pb2.ListLeasesRequest(page_token=first.next_page_token), timeout=10)
    assert [lease.instance_id for lease in [*first.leases, *rest.leases]] == ["a-1", "b-2", "c-3"]
    assert rest.next_page_token == ""
    bad = keyvault_pb2.ListLeasesRequest(instance_ids=["co\x00ins"])
    assert (
        refused(functools.partial(gateway.ListLeases, bad, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    )
    # A full page of the largest leases the grammar and the holder bound allow fits in 4 MiB.
    largest = Lease(
        instance_id="x" * 63,
        holder="h" * MAX_HOLDER_BYTES,
        token=2**63 - 1,
        expires_us=253402300799 * 10**6,
        updated_us=0,
    )
    page = keyvault_pb2.ListLeasesResponse(leases=[lease_message(largest)] * MAX_PAGE_SIZE)
    assert page.ByteSize() < 4 * 1024 * 1024 * 0.75
