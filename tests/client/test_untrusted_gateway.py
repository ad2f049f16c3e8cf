"""The SDK against a gateway it must not trust: a proxy that tampers with what passes through.

A client pinned to another measurement, or shown a tampered bundle, refuses before sending
anything; a tampered or replayed answer is detected when opening it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.client.evil_gateway import EvilGateway, Tamper, evil_gateway
from tests.gateway.support import InProcessMesh, fake_mesh_policy, token_config
from veil.gateway.v1 import gateway_pb2
from veil.sdk.client import VeilClient, connect
from veil.sdk.errors import NotSettledYet
from veil.sdk.identity import new_identity
from veil.sdk.trust_policy import ExpectedMeasurement
from veil.verify.errors import AttestationError


@pytest.fixture
def evil(mesh: InProcessMesh) -> Iterator[tuple[EvilGateway, str]]:
    yield from evil_gateway(mesh)


def _connect(mesh: InProcessMesh, address: str, policy: ExpectedMeasurement | None = None) -> VeilClient:
    return connect(
        address, policy=policy or fake_mesh_policy(), ca=mesh.pki_dir / "ca.pem", data_dir=mesh.data_dir
    )


def _nothing_sent(mesh: InProcessMesh) -> None:
    state = mesh.states[0]
    assert state.calls["Execute"] == state.calls["Query"] == state.calls["CreateInstance"] == 0


def test_client_pinned_to_another_measurement_refuses_to_send(mesh: InProcessMesh) -> None:
    other = ExpectedMeasurement.for_mrenclave("cd" * 32, root="dev", accepted_tcb_statuses=("*",))
    with pytest.raises(AttestationError) as refused:
        mesh.connect(policy=other)
    assert "MRENCLAVE" in refused.value.reason
    _nothing_sent(mesh)


def _flip_quote(reply: Any) -> None:
    reply.quote = reply.quote[:100] + bytes([reply.quote[100] ^ 1]) + reply.quote[101:]


def _swap_keys(reply: Any) -> None:
    reply.keys.hpke_x25519_public_key = bytes(32)


def _change_runtime_data(reply: Any) -> None:
    reply.runtime_data = reply.runtime_data + b"\x00"


def _break_token(reply: Any) -> None:
    reply.attestation_token = reply.attestation_token[:-4] + "AAAA"


@pytest.mark.parametrize("tamper", [_flip_quote, _swap_keys, _change_runtime_data, _break_token])
def test_tampered_bundle_is_refused_and_nothing_is_sent(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str], tamper: Tamper
) -> None:
    servicer, address = evil
    servicer.on_attestation = tamper
    with pytest.raises(AttestationError):
        _connect(mesh, address)
    assert servicer.calls["Execute"] == servicer.calls["Query"] == 0
    _nothing_sent(mesh)


def test_tampered_or_replayed_answers_are_detected(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    servicer, address = evil
    alice = new_identity(mesh.data_dir, "alice")
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
    with _connect(mesh, address) as client:
        token = client.token("coins", alice)
        assert token.mint(alice.account, 10) == 10
        recorded: list[gateway_pb2.ExecuteResponse] = []

        def replay_first(reply: gateway_pb2.ExecuteResponse) -> gateway_pb2.ExecuteResponse:
            recorded.append(reply)
            return recorded[0]

        servicer.on_execute = replay_first
        token.mint(alice.account, 1)  # recorded and passed through
        # Answered with the first (replayed) outcome, and so is the read-only call that would use
        # its counter up: the call is kept (it ran; the host hides it), to resume by its id.
        with pytest.raises(NotSettledYet, match="does not authenticate"):
            token.mint(alice.account, 1)

        def flip(reply: gateway_pb2.ExecuteResponse) -> gateway_pb2.ExecuteResponse:
            sealed = reply.outcome.sealed_response
            reply.outcome.sealed_response = sealed[:-1] + bytes([sealed[-1] ^ 1])
            return reply

        servicer.on_execute = flip
        with pytest.raises(NotSettledYet, match="does not authenticate"):  # kept, as above
            token.mint(alice.account, 1)
