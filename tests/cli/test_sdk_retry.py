"""Item 9 of issue 14: every mutating SDK app method takes a request_id, so an application
can retry a call that failed without an answer and have it run at most once (the retry shown
in veil/sdk/README.md)."""

from __future__ import annotations

import inspect
import time

import pytest

from tests.gateway.support import InProcessMesh, token_config
from veil.errors import GatewayError
from veil.sdk.apps import BallotClient, TokenClient, VaultClient
from veil.sdk.identity import new_identity

MUTATING = {
    TokenClient: ("mint", "transfer"),
    VaultClient: ("put", "share", "revoke", "delete"),
    BallotClient: ("create", "vote", "close"),
}


def test_every_mutating_method_takes_a_request_id() -> None:
    for client, methods in MUTATING.items():
        for method in methods:
            parameter = inspect.signature(getattr(client, method)).parameters.get("request_id")
            assert parameter is not None, f"{client.__name__}.{method}"
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
            assert parameter.default is None


def test_a_retry_with_the_same_request_id_pays_once(mesh: InProcessMesh) -> None:
    treasury = new_identity(mesh.data_dir, "treasury")
    bob = new_identity(mesh.data_dir, "bob")
    with mesh.connect(timeout=1.0) as veil:
        veil.create_instance("coins", token_config(treasury.public_key))
        coins = veil.token("coins", treasury)
        coins.mint(treasury.account, 100)
        mesh.states[0].delay = 1.5  # the answer comes after the caller's deadline; the command runs
        request_id = veil.new_request_id()
        with pytest.raises(GatewayError) as failed:
            coins.transfer(bob.account, 5, request_id=request_id)
        assert failed.value.request_id == request_id
        time.sleep(1.0)  # the first attempt commits meanwhile
        mesh.states[0].delay = 0
        assert coins.transfer(bob.account, 5, request_id=request_id) == 95  # its answer, not a second run
        assert veil.token("coins", bob).balance() == 5
        assert coins.balance() == 95


def test_a_request_id_that_was_answered_gives_its_answer_again_and_names_one_call(
    mesh: InProcessMesh,
) -> None:
    """Calling again with the request id of a call that succeeded returns that answer and sends
    nothing; the same id for another call is refused before anything is sealed."""
    treasury = new_identity(mesh.data_dir, "treasury")
    bob = new_identity(mesh.data_dir, "bob")
    with mesh.connect() as veil:
        veil.create_instance("coins", token_config(treasury.public_key))
        coins = veil.token("coins", treasury)
        coins.mint(treasury.account, 100)
        request_id = veil.new_request_id()
        assert coins.transfer(bob.account, 5, request_id=request_id) == 95
        assert coins.transfer(bob.account, 5, request_id=request_id) == 95  # the first answer
        with pytest.raises(ValueError, match="already names another call"):
            coins.transfer(bob.account, 6, request_id=request_id)
        assert veil.token("coins", bob).balance() == 5
