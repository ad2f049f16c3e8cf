"""Item 10 of issue 14: `veil bench` runs leave no instance behind. The mesh cannot delete an
instance, so the bench reuses one (`bench-<ack>`, its issuer kept in the data dir): two runs,
one instance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.support import Veil
from tests.gateway.support import InProcessMesh, mesh_fixture
from veil.dev.supervisor import DEV_GATEWAY_BURST, DEV_GATEWAY_RATE

TINY = ("--clients", "1", "--processes", "1", "--seconds", "0.3", "--warmup", "0.2")


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    """The gateway's limits of the mesh `veil up` starts, which a bench is meant for (with the
    production default, 400 calls of burst, a fast machine's batched window ran into it)."""
    limits = {"rate_per_second": float(DEV_GATEWAY_RATE), "burst": float(DEV_GATEWAY_BURST)}
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options=limits)


def _instances(veil: Veil) -> list[str]:
    return sorted(i["instance_id"] for i in veil.json("instance", "list")["instances"])


def test_two_bench_runs_leave_one_instance(veil: Veil) -> None:
    assert _instances(veil) == []
    first = json.loads(veil.ok("bench", *TINY, "--json"))
    second = json.loads(veil.ok("bench", *TINY, "--json"))
    assert first["instance"] == second["instance"] == "bench-strict"
    assert first["confidential_tps"] > 0
    assert second["confidential_tps"] > 0
    assert second["errors"] == {}
    assert second["relay_tps"] > 0
    assert second["ratio_to_relay"] is not None
    # The bench client is always measured, so every window cost it some CPU per call.
    assert set(second["cpu_ms_per_call"]) == {"confidential", "baseline", "relay"}
    assert all(ms > 0 for ms in second["cpu_ms_per_call"].values())
    assert _instances(veil) == ["bench-strict"]
    assert (veil.mesh.data_dir / "identities" / "bench-issuer.key").stat().st_mode & 0o077 == 0


def test_bench_batch_sends_each_clients_transfers_in_batches(veil: Veil) -> None:
    """`--batch N` (issue 13): a client's next N transfers in one ExecuteBatch; all verified."""
    state = veil.mesh.states[0]
    batches = state.calls["ExecuteBatch"]
    report = json.loads(veil.ok("bench", *TINY, "--batch", "8", "--json"))
    assert report["batch"] == 8
    assert report["errors"] == {}
    assert report["confidential_tps"] > 0
    assert state.calls["ExecuteBatch"] > batches
