"""A read fence the enclave refuses because another host took the instance over meanwhile.

Host a is paused, its lease on x expires, host b adopts x and moves its head on. When a resumes,
a query on x waiting for a read fence gets the keyvault's statement of b's head, which a's
enclave rightly refuses (not on its chain). That is the loss of x alone, as an advance refused
LEASE_LOST is: a drops x (its held answers fail, "moved") and keeps serving y. Only while the
lease is still a's own (a fork, or a boot left behind) does the whole replica stop serving."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from tests.enclave.support import NOW_MS, Harness, config, vault
from veil.enclave.v1 import apps_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state.errors import NotServing
from veil.services.state.keyvault_client import KeyvaultRefused, KeyvaultUnavailable, RemoteHead
from veil.services.state.startup import HostParts, InstanceState, Runtime, Startup


class _Keyvault:
    """The keyvault as host a sees it: the harness's heads, and leases (x's is `x_lease`)."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.tokens = 0
        self.x_lease: keyvault_pb2.Lease | Exception | None = None

    def acquire_lease(
        self, instance_id: str, holder: str, ttl_ms: int, token: int, **_: Any
    ) -> keyvault_pb2.Lease:
        self.tokens += 1
        return keyvault_pb2.Lease(instance_id=instance_id, holder=holder, fencing_token=self.tokens)

    def get_commit_head(self, instance_id: str, _enclave_key: bytes, challenge: bytes) -> RemoteHead:
        statement = self.harness.statement_for(instance_id, challenge)
        return RemoteHead(statement.head.sequence, statement.head.hash, statement)

    def list_leases(self, instance_ids: list[str]) -> list[keyvault_pb2.Lease]:
        if isinstance(self.x_lease, Exception):
            raise self.x_lease
        return [self.x_lease] if self.x_lease is not None and "x" in instance_ids else []


def _taken_over(a: Harness, tmp_path: Path) -> tuple[Startup, Runtime, _Keyvault, int]:
    """Host a serving x and y; x taken over by another boot that moved its head on; a query on
    x waiting for a read fence. Returns a's start-up, runtime, keyvault and the query's round."""
    a.create("x", config())
    a.create("y", config())
    alice = a.client("x")
    a.call(alice, vault(put=apps_pb2.VaultPut(record_id="r", data=b"1")))
    b = a.restarted()
    b.restore("x", [e.SerializeToString() for e in a.log["x"]])
    b.call(b.client("x", account="bob"), vault(put=apps_pb2.VaultPut(record_id="s", data=b"2")))
    keyvault = _Keyvault(a)
    parts = HostParts(
        config=SimpleNamespace(sealed_cache=tmp_path / "sealed"),  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        keyvault=keyvault,  # type: ignore[arg-type]
        lifecycle=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
        backoff=None,  # type: ignore[arg-type]
        stop=threading.Event(),
    )
    startup = Startup(parts, lambda: a.host)
    runtime = Runtime(
        enclave=a.host,
        keys=a.keys,
        mrenclave=b"",
        attestor=None,  # type: ignore[arg-type]
        provisioner=None,  # type: ignore[arg-type]
        advancer=None,  # type: ignore[arg-type]
    )
    for iid in ("x", "y"):
        startup.ownership.acquire(iid)
        runtime.instances[iid] = InstanceState(config(), a.keyvault[iid].head, 0)
    startup.ownership.on_lost = runtime.drop
    sealed = alice.seal(vault(get=apps_pb2.VaultGet(owner="alice", record_id="r")), counter=0)
    query = a.host.query("x", sealed.command, NOW_MS)
    assert query.read_round
    return startup, runtime, keyvault, query.read_round


def _fence(startup: Startup, runtime: Runtime) -> tuple[int, list[str], list[str]]:
    refused: list[str] = []
    broken: list[str] = []
    waiting = startup._read_fence(
        runtime, "x", lambda _r, why: refused.append(why), lambda _r, why: broken.append(why)
    )
    return waiting, refused, broken


def test_a_fence_refused_after_a_take_over_drops_that_instance_only(harness: Harness, tmp_path: Path) -> None:
    startup, runtime, keyvault, read_round = _taken_over(harness, tmp_path)
    held = runtime.holds.read_key("x", read_round)
    keyvault.x_lease = keyvault_pb2.Lease(instance_id="x", holder="node-b", fencing_token=keyvault.tokens + 1)
    assert _fence(startup, runtime) == (-1, [], [])
    assert list(runtime.instances) == ["y"]
    assert "x" in runtime.stale
    assert startup.ownership.token("x") == 0
    assert startup.ownership.token("y")
    with pytest.raises(NotServing, match="moved to another replica"):
        held.result(0)


@pytest.mark.parametrize("lease", ["ours", "none", "unreadable"])
def test_a_fence_refused_while_the_lease_is_ours_stops_the_replica(
    harness: Harness, tmp_path: Path, lease: str
) -> None:
    """Still a's lease (or no lease, or none readable): the keyvault's head not on a's chain is a
    fork or a boot left behind, which is the whole replica's to stop for (fail closed)."""
    startup, runtime, keyvault, _ = _taken_over(harness, tmp_path)
    if lease == "ours":
        token = startup.ownership.token("x")
        keyvault.x_lease = keyvault_pb2.Lease(
            instance_id="x", holder=startup.ownership.holder, fencing_token=token
        )
    elif lease == "unreadable":
        keyvault.x_lease = KeyvaultRefused("no", status=grpc.StatusCode.PERMISSION_DENIED, reason="DENIED")
    waiting, refused, broken = _fence(startup, runtime)
    assert waiting == -1
    assert not broken
    assert len(refused) == 1, refused
    assert "not on this enclave's chain" in refused[0]
    assert set(runtime.instances) == {"x", "y"}
    assert startup.ownership.token("x")


def test_a_fence_refused_while_the_lease_cannot_be_read_is_retried(harness: Harness, tmp_path: Path) -> None:
    """The keyvault away just then: neither verdict; the advancer retries the fence later."""
    startup, runtime, keyvault, _ = _taken_over(harness, tmp_path)
    keyvault.x_lease = KeyvaultUnavailable("keyvault at kv:1 unreachable")
    with pytest.raises(KeyvaultUnavailable):
        _fence(startup, runtime)
    assert set(runtime.instances) == {"x", "y"}
    assert startup.ownership.token("x")
