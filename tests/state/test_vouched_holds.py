"""Issue 13: a strict instance's answers are released by the hold keys the keyvault sends with its
confirmation (wire.hold_key), so a batch costs one ECALL, not two (ExecuteBatch + ConfirmHead).
A hold key that does not match the enclave's check opens nothing: the enclave releases those
answers itself, as before; and the enclave is still told every ENCLAVE_CONFIRM_EVERY entries,
so its holds never pile up to its limit."""

from __future__ import annotations

from typing import Any

import pytest

from tests.state import support
from tests.state.support import Node, token_instance
from tests.state.test_host import run
from veil.dev.loadclient import mint
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state import startup
from veil.services.state.enclave_host import EnclaveHost

COMMANDS = 12


@pytest.fixture
def confirm_heads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sequences of the confirmations handed to the enclave (ConfirmHead ECALLs)."""
    seen: list[int] = []
    real = EnclaveHost.confirm_head

    def counting(self: EnclaveHost, confirmation: Any = None, **kwargs: Any) -> Any:
        if confirmation is not None:
            seen.append(confirmation.head.sequence)
        return real(self, confirmation, **kwargs)

    monkeypatch.setattr(EnclaveHost, "confirm_head", counting)
    return seen


def _mint_serially(node: Node) -> list[int]:
    """The supply after each of COMMANDS mints, one batch each, on a fresh strict instance."""
    host = node.serving()
    setup = token_instance(host)
    supplies = []
    for _ in range(COMMANDS):
        response, result = run(host, setup.issuer, mint(setup.accounts[0].account, 1))
        assert response.outcome.accepted
        supplies.append(result.result.token.mint.amount)
    return supplies


def test_the_keyvaults_hold_keys_release_strict_answers_without_a_confirm_head(
    node: Node, confirm_heads: list[int]
) -> None:
    assert _mint_serially(node) == list(range(1, COMMANDS + 1))
    # Only the creation's head goes to the enclave: it registers the instance for this boot.
    assert confirm_heads == [1]


def test_a_hold_key_that_does_not_match_opens_nothing_and_the_enclave_releases_instead(
    node: Node, confirm_heads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    class ForgingKeyvault(support.CountingKeyvault):
        """A keyvault path that hands the host wrong hold keys (a bit flipped in each)."""

        def advance_commit_head(self, links: Any, token: str) -> keyvault_pb2.AdvanceCommitHeadResponse:
            advanced = super().advance_commit_head(links, token)
            for hold in advanced.hold_keys:
                hold.key = bytes([hold.key[0] ^ 1]) + hold.key[1:]
            return advanced

    monkeypatch.setattr(support, "CountingKeyvault", ForgingKeyvault)
    assert _mint_serially(node) == list(range(1, COMMANDS + 1))  # every answer right, none lost
    assert len(confirm_heads) == COMMANDS + 1  # each batch's answers released by the enclave


def test_the_enclave_is_still_told_every_so_many_entries(
    node: Node, confirm_heads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(startup, "ENCLAVE_CONFIRM_EVERY", 4)
    assert _mint_serially(node) == list(range(1, COMMANDS + 1))
    assert confirm_heads == [1, 5, 9, 13]  # sequence 1 is the genesis; each mint one entry
