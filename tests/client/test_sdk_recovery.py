"""The SDK across restarts: transient failures retried (same request) until the deadline, and a
command refused as unopenable by a restarted enclave sealed again to the new keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tests.client.evil_gateway import EvilGateway, evil_gateway
from tests.gateway.support import InProcessMesh, fake_mesh_policy, token_config
from veil.sdk.client import connect
from veil.sdk.identity import new_identity
from veil.services.common.errors import InvalidArgument, Unavailable, VeilError, abort


@dataclass
class FlakyGateway(EvilGateway):
    """Fails the next Execute calls with the planned errors, then forwards again."""

    failures: list[VeilError] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.request_ids.append(request.request_id)
        self.commands.append(request.command.SerializeToString())
        if self.failures:
            self.calls["Execute"] += 1
            abort(context, self.failures.pop(0))
        return super().Execute(request, context)


@pytest.fixture
def flaky(mesh: InProcessMesh, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FlakyGateway, str]]:
    # evil_gateway builds an EvilGateway; build ours in its place.
    monkeypatch.setattr("tests.client.evil_gateway.EvilGateway", FlakyGateway)
    yield from evil_gateway(mesh)  # type: ignore[misc]  # yields our subclass


Minting = tuple[FlakyGateway, Callable[[], int]]


@pytest.fixture
def minting(mesh: InProcessMesh, flaky: tuple[FlakyGateway, str]) -> Iterator[Minting]:
    """The flaky gateway, and alice minting 5 coins on "coins" through it (one client)."""
    gateway, address = flaky
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
    with connect(
        address, policy=fake_mesh_policy(), ca=mesh.pki_dir / "ca.pem", data_dir=mesh.data_dir
    ) as client:
        yield gateway, lambda: client.token("coins", alice).mint(alice.account, 5)


def test_transient_failures_are_retried_past_a_few_attempts(mesh: InProcessMesh, minting: Minting) -> None:
    gateway, mint = minting
    gateway.failures = [Unavailable("the state replica is restarting")] * 5
    assert mint() == 5
    assert len(set(gateway.request_ids)) == 1
    assert len(set(gateway.commands)) == 1
    assert mesh.states[0].calls["Execute"] == 1


def test_unopenable_status_is_sealed_again_to_fresh_keys(mesh: InProcessMesh, minting: Minting) -> None:
    gateway, mint = minting
    gateway.failures = [InvalidArgument("sealed to old keys", reason="COMMAND_UNOPENABLE")]
    before = gateway.calls["GetAttestation"]
    assert mint() == 5
    assert gateway.calls["GetAttestation"] == before + 2  # the instance's first use, then again
    assert len(set(gateway.commands)) == 2  # sealed again: new bytes...
    assert len(set(gateway.request_ids)) == 1  # ...under the call's request id
    assert mesh.states[0].calls["Execute"] == 1


def test_other_invalid_arguments_are_not_retried(mesh: InProcessMesh, minting: Minting) -> None:
    gateway, mint = minting
    gateway.failures = [InvalidArgument("bad request")]
    with pytest.raises(Exception, match="bad request"):
        mint()
    assert mesh.states[0].calls["Execute"] == 0
