"""Instance ownership between two state hosts over one database: the fenced-off old owner
acknowledges nothing, the new owner takes over, nothing acknowledged is lost or duplicated."""

from __future__ import annotations

import time

import pytest

from tests.state.support import Node, keyvault_head, rebind, token_instance, wait_for_keyvault_head
from tests.state.test_host import TIMEOUT, read, run
from veil.dev.loadclient import balance, mint
from veil.services.common.config import ENV_STATE_LEASE_TTL_MS, ENV_STATE_NODE_NAME
from veil.services.common.errors import NotFound
from veil.services.state import lifecycle
from veil.services.state.errors import NotServing
from veil.services.state.host import StateHost

TTL_MS = 1000


def start(node: Node, monkeypatch: pytest.MonkeyPatch, name: str) -> StateHost:
    """A host on its own "machine" (platform secret, seal directory) over the shared database."""
    monkeypatch.setenv(ENV_STATE_NODE_NAME, name)
    monkeypatch.setenv(ENV_STATE_LEASE_TTL_MS, str(TTL_MS))
    return node.serving(name, seal_dir=node.directory / f"sealed-{name}")


def served(host: StateHost) -> list[str]:
    return [instance.instance_id for instance in host.list_instances()]


def test_the_fenced_off_owner_acknowledges_nothing_and_the_new_owner_takes_over(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = start(node, monkeypatch, "node-a")
    setup = token_instance(old)
    alice, bob = setup.accounts
    run(old, setup.issuer, mint(alice.account, 100))
    new = start(node, monkeypatch, "node-b")
    assert served(new) == []  # node-a owns it and renews
    # node-a stops renewing (paused, cut off); node-b takes over once the lease expires.
    old._startup.ownership.renew_all = lambda: None  # type: ignore[method-assign]
    paused = time.monotonic()
    while served(new) != ["tokens"]:
        assert time.monotonic() - paused < 10, "no take-over"
        time.sleep(0.05)
    took_over = time.monotonic() - paused
    head = keyvault_head(node, "tokens")
    # node-a still believes it owns the instance: its enclave executes, its database write may
    # land, but the keyvault refuses the advance (LEASE_LOST) so the held answer never releases.
    sealed = setup.issuer.seal(mint(bob.account, 5))
    with pytest.raises(NotServing, match="moved to another replica"):
        old.execute("tokens", sealed.command, sealed.request_id, TIMEOUT)
    assert keyvault_head(node, "tokens") == head
    with pytest.raises(NotFound):
        run(old, setup.issuer, mint(bob.account, 5))
    setup.issuer.counter -= 1  # that command never reached an enclave: its counter is free
    assert old.lifecycle.current()[0] == lifecycle.SERVING  # its other instances (none) stay served
    # The client retries the same sealed command at the new owner, until it is answered.
    for account in (setup.issuer, alice, bob):
        rebind(account, new.attestation_bundle().keys)
    deadline = time.monotonic() + 20
    while True:
        again = setup.issuer.seal(
            mint(bob.account, 5), counter=sealed.request.counter, request_id=sealed.request_id
        )
        try:
            response = new.execute("tokens", again.command, again.request_id, TIMEOUT)
            break
        except NotServing:
            assert time.monotonic() < deadline
            new.wait_until({lifecycle.SERVING}, 10)
            for account in (setup.issuer, alice, bob):
                rebind(account, new.attestation_bundle().keys)
    # node-a's unacknowledged command reached the shared database before node-b's first write
    # (which then conflicted: node-b recovered from the database, node-a's entry included), so
    # the retry under the same counter is answered with that counter's last receipt: it ran
    # once. Nothing acknowledged is lost, nothing runs twice.
    opened = setup.issuer.open(again, response.outcome)
    if opened.HasField("error"):
        assert opened.counter.last_sequence == head + 1
        assert opened.counter.last_receipt.sequence == head + 1
    assert read(new, alice, balance()) == 100
    assert read(new, bob, balance()) == 5
    wait_for_keyvault_head(node, "tokens", head + 1)
    print(f"take-over {took_over:.2f}s after the last renewal (lease ttl {TTL_MS} ms)")
    # Now node-b stops renewing and node-a, renewing again, takes the instance back: its enclave
    # still holds the old copy (never replaced within a boot), so it boots a new enclave first.
    del old._startup.ownership.renew_all
    new._startup.ownership.renew_all = lambda: None  # type: ignore[method-assign]
    deadline = time.monotonic() + 20
    while True:
        try:
            if served(old) == ["tokens"]:
                break
        except NotServing:
            pass  # booting the new enclave
        assert time.monotonic() < deadline, "node-a did not take the instance back"
        time.sleep(0.05)
    for account in (setup.issuer, alice, bob):
        rebind(account, old.attestation_bundle().keys)
    _, minted = run(old, setup.issuer, mint(bob.account, 1))
    assert not minted.HasField("error"), minted.error
    assert read(old, bob, balance()) == 6
