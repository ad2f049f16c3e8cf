"""Key-name squatting at the keyvault (issue 17, item 8), against the real server over mTLS.

The state host creates instance keys only (`instance.<id>`); a destroyed name is never created
again, by anyone; request ids are scoped per caller identity, so the state host can neither
replay nor block an id the admin uses.
"""

from __future__ import annotations

import functools

import grpc
import pytest

from tests.conftest import refused
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc

from .support import Stubs, policy_json

POLICY = policy_json({"claim": "x-ms-sgx-is-debuggable", "equals": False})


def _create(
    stub: keyvault_pb2_grpc.KeyvaultServiceStub, name: str, request_id: str = ""
) -> keyvault_pb2.KeyMetadata:
    reply = stub.CreateKey(
        keyvault_pb2.CreateKeyRequest(key_name=name, release_policy_json=POLICY, request_id=request_id),
        timeout=10,
    )
    return reply.key


@pytest.mark.parametrize("name", ["payroll", "orders.v2", "instancex.coins", "release-key"])
def test_the_state_host_cannot_create_other_names(stub: Stubs, name: str) -> None:
    state, admin = stub("state"), stub("admin")
    assert refused(lambda: _create(state, name)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "KEY_NAME_NOT_ALLOWED",
    )
    assert _create(admin, name).key_name == name  # the name was not taken by the refusal


def test_the_state_host_creates_instance_keys(stub: Stubs) -> None:
    assert _create(stub("state"), "instance.coins").latest_version == 1


def test_a_destroyed_name_is_never_created_again(stub: Stubs) -> None:
    state, admin = stub("state"), stub("admin")
    _create(state, "instance.coins")
    admin.DestroyKey(keyvault_pb2.DestroyKeyRequest(key_name="instance.coins"), timeout=10)
    for who in (state, admin):
        recreate = functools.partial(_create, who, "instance.coins")
        assert refused(recreate) == (grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS")
    key = admin.GetKey(keyvault_pb2.GetKeyRequest(key_name="instance.coins"), timeout=10).key
    assert key.destroyed


def test_request_ids_are_scoped_per_caller(stub: Stubs) -> None:
    state, admin = stub("state"), stub("admin")
    # The state host claims an id first, hoping the admin's request with it returns the host's key.
    _create(state, "instance.coins", request_id="rotate-2026-12")
    created = _create(admin, "payroll", request_id="rotate-2026-12")
    assert created.key_name == "payroll"  # the admin's own request ran
    # And a repeat by each caller returns that caller's own first answer.
    assert _create(admin, "payroll", request_id="rotate-2026-12").key_name == "payroll"
    assert _create(state, "instance.coins", request_id="rotate-2026-12").key_name == "instance.coins"
    # An id the admin used is no conflict for the state host: its own request runs.
    admin.RotateKey(keyvault_pb2.RotateKeyRequest(key_name="payroll", request_id="admin-op"), timeout=10)
    assert _create(state, "instance.other", request_id="admin-op").key_name == "instance.other"
    payroll = admin.GetKey(keyvault_pb2.GetKeyRequest(key_name="payroll"), timeout=10).key
    assert payroll.latest_version == 2
