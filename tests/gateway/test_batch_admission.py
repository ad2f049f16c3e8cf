"""ExecuteBatch admission: the authentication plugin runs once per instance id per call.

Each command of a batch still takes its own rate-limit token (docs/protocol.md, section 6,
Batches), but the plugin's verdict (an API-key hash, a JWT signature verification) is the same
for every command of one call naming one instance: the credentials are the call's. A client
whose bucket is empty must not get 256 plugin runs for the price of nothing (outside review).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from tests.gateway.support import InProcessMesh, mesh_fixture
from tests.gateway.test_public_batch import _batch
from veil.gateway.v1 import gateway_pb2
from veil.services.gateway.auth import Authenticators, Credentials, Principal


@pytest.fixture
def throttled(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"rate_per_second": 0.001, "burst": 5})


def _count_plugin_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = Authenticators.authenticate

    def counted(self: Authenticators, instance_id: str, credentials: Credentials) -> Principal:
        calls.append(instance_id)
        return original(self, instance_id, credentials)

    monkeypatch.setattr(Authenticators, "authenticate", counted)
    return calls


def _codes(answers: dict[int, Any]) -> set[int]:
    return {a.code for a in answers.values() if isinstance(a, status_pb2.Status)}


def test_an_empty_bucket_costs_a_batch_one_plugin_run(
    throttled: InProcessMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_plugin_runs(monkeypatch)
    junk = [gateway_pb2.ExecuteRequest(instance_id="coins", request_id=f"r{i}") for i in range(256)]
    first = _batch(throttled.address, throttled.pki_dir, junk)
    assert len(first) == 256
    assert len(calls) == 1  # one plugin run for the call, not one per command
    calls.clear()
    answers = _batch(throttled.address, throttled.pki_dir, junk)
    assert len(answers) == 256
    # Every command is still charged (and refused) on its own.
    assert _codes(answers) == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert len(calls) <= 1, f"{len(calls)} plugin runs for one call with an empty bucket"


def test_each_instance_id_of_a_batch_is_authenticated_once(
    throttled: InProcessMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_plugin_runs(monkeypatch)
    commands = [
        gateway_pb2.ExecuteRequest(instance_id=name, request_id=f"r{i}")
        for i in range(4)
        for name in ("coins", "ballots", "coins")
    ]
    answers = _batch(throttled.address, throttled.pki_dir, commands)
    assert len(answers) == 12
    assert sorted(calls) == ["ballots", "coins"]
    # Five tokens in the bucket: the first five commands pass admission (then fail their shape
    # check), the other seven are refused by the rate limit, one token asked for each.
    limited = [i for i, a in answers.items() if a.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert sorted(limited) == list(range(5, 12))
