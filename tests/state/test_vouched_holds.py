"""Issue 13: a strict instance's answers are released by the hold keys the keyvault sends with its
confirmation (wire.hold_key), so a batch costs one ECALL, not two (ExecuteBatch + ConfirmHead).
A hold key that does not match the enclave's check opens nothing: the enclave releases those
answers itself, as before; and the enclave is still told every ENCLAVE_CONFIRM_EVERY entries,
and once the advancer is idle, so its holds never pile up to its limit and an idle instance
keeps none there."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.state import support
from tests.state.support import Node, TokenSetup, token_instance
from tests.state.test_host import run
from veil.dev.loadclient import mint
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.runner import build_enclave
from veil.enclave.runtime import Enclave
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state import heads, startup
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.host import StateHost
from veil.services.state.runner import runner_options

COMMANDS = 12
IDLE_MINTS = 30
WARM_UP_BATCHES = 50


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


def _mint(host: StateHost, setup: TokenSetup) -> int:
    response, result = run(host, setup.issuer, mint(setup.accounts[0].account, 1))
    assert response.outcome.accepted
    return int(result.result.token.mint.amount)


def _warmed_up(node: Node, confirm_heads: list[int]) -> tuple[StateHost, TokenSetup]:
    """A strict token instance whose hold root the keyvault has at hand: it makes it off its
    advance path, so the first batches may still be released by the enclave."""
    host = node.serving()
    setup = token_instance(host)
    for _ in range(WARM_UP_BATCHES):
        before = len(confirm_heads)
        _mint(host, setup)
        if len(confirm_heads) == before:
            return host, setup
    raise AssertionError(f"every batch needed a ConfirmHead: {confirm_heads}")


def test_the_keyvaults_hold_keys_release_strict_answers_without_a_confirm_head(
    node: Node, confirm_heads: list[int]
) -> None:
    host, setup = _warmed_up(node, confirm_heads)
    assert confirm_heads[0] == 1  # the creation's head: it registers the instance for this boot
    before, supply = list(confirm_heads), _mint(host, setup)
    released = host.metrics.snapshot()["holds_released_by_keyvault"]
    assert [_mint(host, setup) for _ in range(COMMANDS)] == list(range(supply + 1, supply + COMMANDS + 1))
    assert confirm_heads == before
    assert host.metrics.snapshot()["holds_released_by_keyvault"] == released + COMMANDS  # one hold a batch
    status = host.status()  # what the gateway's GetStatus and `veil status` show of it
    assert (status.holds_released_by_keyvault, status.holds_released_by_enclave) == (
        released + COMMANDS,
        host.metrics.snapshot()["holds_released_by_enclave"],
    )
    assert status.holds_released_by_enclave >= 1  # the creation's, released at registration


def test_a_hold_key_that_does_not_match_opens_nothing_and_the_enclave_releases_instead(
    node: Node, confirm_heads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    forged: list[int] = []

    class ForgingKeyvault(support.CountingKeyvault):
        """A keyvault path that hands the host wrong hold keys (a bit flipped in each)."""

        def advance_commit_head(
            self, links: Any, token: str, hold_key_version: int = 0
        ) -> keyvault_pb2.AdvanceCommitHeadResponse:
            advanced = super().advance_commit_head(links, token, hold_key_version)
            for hold in advanced.hold_keys:
                hold.key = bytes([hold.key[0] ^ 1]) + hold.key[1:]
                forged.append(hold.sequence)
            return advanced

    monkeypatch.setattr(support, "CountingKeyvault", ForgingKeyvault)
    host = node.serving()
    setup = token_instance(host)
    assert [_mint(host, setup) for _ in range(COMMANDS)] == list(range(1, COMMANDS + 1))  # none lost
    assert confirm_heads == list(range(1, COMMANDS + 2))  # each batch's answers released by the enclave
    assert forged  # (the keyvault did send hold keys: they were forged, not missing)
    metrics = host.metrics.snapshot()
    assert metrics["holds_released_by_keyvault"] == 0
    assert metrics["holds_released_by_enclave"] == COMMANDS + 1  # the genesis's hold and each batch's


def test_the_enclave_is_still_told_every_so_many_entries(
    node: Node, confirm_heads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(startup, "ENCLAVE_CONFIRM_EVERY", 4)
    monkeypatch.setattr(heads, "IDLE_AFTER_S", 60.0)  # (no idle hand-over within the test)
    host, setup = _warmed_up(node, confirm_heads)
    before = len(confirm_heads)
    last = confirm_heads[-1]
    for _ in range(COMMANDS):
        _mint(host, setup)
    # Each mint is one entry: the enclave hears of every fourth head, and of no other.
    assert confirm_heads[before:] == [last + 4, last + 8, last + 12]


def test_an_idle_strict_instance_keeps_no_holds_in_the_enclave(node: Node) -> None:
    """The enclave keeps a hold per batch until it is handed a confirmation covering it; the
    confirmations the keyvault's hold keys made unnecessary are handed over once the advancer is
    idle (the second review found 60 holds kept for good after 60 mints)."""
    enclaves: list[Enclave] = []

    def factory(settings: StateConfig) -> EnclaveHost:
        enclave = build_enclave(runner_options(settings))
        enclaves.append(enclave)
        return EnclaveHost.from_dispatcher(Dispatcher(enclave))

    host = node.serving(enclave_factory=factory)
    setup = token_instance(host)
    for _ in range(IDLE_MINTS):
        _mint(host, setup)
    [enclave] = enclaves
    instance = enclave._instances[setup.instance_id]
    deadline = time.monotonic() + 10
    while instance.holds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.holds == []
    assert instance.confirmed.sequence == IDLE_MINTS + 1  # the genesis and every mint
