"""The memory budget: writes beyond it are refused with RESOURCE_EXHAUSTED, changing nothing."""

from __future__ import annotations

import pytest

from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import Harness, config, error_code, vault, wrap_key
from veil.enclave.v1 import apps_pb2, error_pb2
from veil.services.state.enclave_host import EnclaveCallError

BUDGET = 4096


def _put(record_id: str, size: int) -> apps_pb2.AppCall:
    return vault(put=apps_pb2.VaultPut(record_id=record_id, data=b"x" * size))


def test_writes_beyond_the_budget_are_refused_and_change_nothing(make_enclave: MakeEnclave) -> None:
    harness = Harness.start(make_enclave(), memory_budget_bytes=BUDGET)
    harness.create("v", config())
    alice, bob = harness.client("v", account="alice"), harness.client("v", account="bob")
    assert harness.run("v", bob.seal(_put("a", 1000)))[0].accepted
    status = harness.host.get_status()
    assert status.memory_budget_bytes == BUDGET
    used = status.memory_used_bytes
    assert 1000 < used < 1100  # record bytes plus keys and bob's counter

    big = alice.seal(_put("b", 3500))
    before = harness.enclave.state_digest()
    (refused,) = harness.run("v", big)
    assert not refused.accepted
    assert refused.error.code == error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED  # the host must know
    assert error_code(alice.read(big, refused)) == "RESOURCE_EXHAUSTED"
    assert alice.read(big, refused).may_run_later  # the budget is the host's: not final
    assert harness.enclave.state_digest() == before
    assert harness.host.get_status().memory_used_bytes == used

    # Nothing was consumed, not even alice's counter: the same command succeeds once space is freed.
    assert harness.run("v", bob.seal(vault(delete=apps_pb2.VaultDelete(record_id="a"))))[0].accepted
    assert harness.run("v", big)[0].accepted
    assert harness.host.get_status().memory_used_bytes > 3000


def test_budget_counts_every_instance_and_bounds_restore(make_enclave: MakeEnclave) -> None:
    harness = Harness.start(make_enclave(), memory_budget_bytes=BUDGET)
    harness.create("v", config())
    harness.create("w", config())
    assert harness.run("v", harness.client("v").seal(_put("a", 2500)))[0].accepted
    assert not harness.run("w", harness.client("w").seal(_put("a", 2500)))[0].accepted

    small = Harness.start(make_enclave(), memory_budget_bytes=1024)
    small.host.provision_key("v", 1, wrap_key(small.keys, "v", 1, harness.data_keys[("v", 1)]))
    before = small.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="RESOURCE_EXHAUSTED"):
        small.restore("v", harness.log["v"])
    assert small.enclave.state_digest() == before
