"""Instance leases: one owner at a time, a fencing token that only grows, and the fence on every
head advance and instance-key release (SQLite and PostgreSQL, across two replicas)."""

from __future__ import annotations

import json

import pytest

from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.errors import InvalidArgumentError
from veil.services.keyvault.heads import CommitHeads
from veil.services.keyvault.keys import KeyManager
from veil.services.keyvault.leases import MAX_LISTED_IDS, Lease, LeaseError, Leases
from veil.services.keyvault.store import Store
from veil.services.keyvault.tokens import TokenIssuer

from .support import ADMIN, CALLER, FakeClock, FakeEnclave, measurement_policy, run_concurrently
from .test_heads import INSTANCE, ZERO, at

TTL_MS = 5_000


@pytest.fixture
def leases(store: Store, audit: AuditLog, clock: FakeClock) -> Leases:
    return Leases(store, audit, clock)


def take(leases: Leases, holder: str, token: int = 0, instance: str = INSTANCE) -> Lease:
    return leases.acquire(instance, holder, TTL_MS, token, caller=CALLER)


def move(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, fencing: int, *path: tuple[int, bytes]
) -> int:
    links = [enclave.link(INSTANCE, path[i], path[i + 1]) for i in range(len(path) - 1)]
    head, _ = heads.advance(
        INSTANCE, links, enclave.token(issuer).token, caller=CALLER, fencing_token=fencing
    )
    return head.sequence


def test_one_owner_until_expiry_then_a_new_token_for_the_next(leases: Leases, clock: FakeClock) -> None:
    first = take(leases, "node-a")
    assert (first.holder, first.token) == ("node-a", 1)
    with pytest.raises(LeaseError) as held:
        take(leases, "node-b")
    assert held.value.reason == "LEASE_HELD"
    clock.advance(2.0)
    renewed = take(leases, "node-a", first.token)
    assert renewed.token == 1
    assert renewed.expires_us > first.expires_us
    clock.advance(TTL_MS / 1000 + 0.1)  # node-a stopped renewing (paused, cut off, dead)
    second = take(leases, "node-b")
    assert (second.holder, second.token) == ("node-b", 2)
    with pytest.raises(LeaseError) as lost:  # node-a wakes up and renews: too late
        take(leases, "node-a", first.token)
    assert lost.value.reason == "LEASE_LOST"
    # The same node asking again (a restart) gets a new token: its paused predecessor is fenced too.
    assert take(leases, "node-b").token == 3
    assert [(lease.holder, lease.token) for lease in leases.list()] == [("node-b", 3)]


def test_an_expired_lease_nobody_took_can_still_be_renewed(leases: Leases, clock: FakeClock) -> None:
    first = take(leases, "node-a")
    clock.advance(TTL_MS / 1000 * 3)
    assert take(leases, "node-a", first.token).token == first.token


def test_the_fenced_off_owner_cannot_advance_the_head(
    leases: Leases,
    heads: CommitHeads,
    issuer: TokenIssuer,
    enclave: FakeEnclave,
    clock: FakeClock,
    audit: AuditLog,
) -> None:
    old = take(leases, "node-a")
    assert move(heads, issuer, enclave, old.token, ZERO, at(1), at(2)) == 2
    clock.advance(TTL_MS / 1000 + 1)
    new = take(leases, "node-b")
    successor = FakeEnclave()  # the new owner's enclave boot
    with pytest.raises(LeaseError) as refused:  # the old owner's held batch: never confirmed
        move(heads, issuer, enclave, old.token, at(2), at(3))
    assert refused.value.reason == "LEASE_LOST"
    event = audit.list_events(page_size=1000).events[-1]
    assert (event.action, event.outcome) == ("advance_commit_head", "refused")
    assert json.loads(event.detail_json)["reason"] == "LEASE_LOST"
    for stale in (0, new.token + 1):  # no token, or one the keyvault never gave
        with pytest.raises(LeaseError):
            move(heads, issuer, successor, stale, at(2), at(3))
    assert move(heads, issuer, successor, new.token, at(2), at(3)) == 3
    stored = heads.get(INSTANCE)
    assert stored is not None
    assert stored.signing_public_key == successor.signing_public_bytes
    # Without a lease an instance is not fenced (hosts from before leases), but a made-up token is refused.
    links = [enclave.link("other", ZERO, at(1))]
    with pytest.raises(LeaseError) as unknown:
        heads.advance("other", links, enclave.token(issuer).token, caller=CALLER, fencing_token=7)
    assert unknown.value.reason == "LEASE_UNKNOWN"


def test_the_fenced_off_owner_cannot_obtain_the_instance_key(
    leases: Leases, keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, clock: FakeClock
) -> None:
    name = f"instance.{INSTANCE}"
    keys.create(name, measurement_policy(), caller=CALLER)
    old = take(leases, "node-a")
    keys.release(enclave.token(issuer).token, name, caller=CALLER, fencing_token=old.token)
    clock.advance(TTL_MS / 1000 + 1)
    new = take(leases, "node-b")
    with pytest.raises(LeaseError) as refused:
        keys.release(enclave.token(issuer).token, name, caller=CALLER, fencing_token=old.token)
    assert refused.value.reason == "LEASE_LOST"
    released = keys.release(FakeEnclave().token(issuer).token, name, caller=CALLER, fencing_token=new.token)
    assert released.name == name
    keys.create("orders", measurement_policy(), caller=ADMIN)  # not an instance key: not fenced
    keys.release(enclave.token(issuer).token, "orders", caller=CALLER)


def test_concurrent_takeovers_across_replicas_grant_one_owner(
    store: Store, replica: Store, audit: AuditLog, clock: FakeClock
) -> None:
    """Eight hosts race for an expired lease through two keyvault replicas: exactly one wins."""
    replicas = [Leases(store, audit, clock), Leases(replica, AuditLog(replica, clock), clock)]
    take(replicas[0], "node-0")
    clock.advance(TTL_MS / 1000 + 1)

    def race(index: int) -> Lease | str:
        try:
            return take(replicas[index % 2], f"node-{index + 1}")
        except LeaseError as exc:
            return exc.reason

    outcomes = run_concurrently(8, race)
    winners = [outcome for outcome in outcomes if isinstance(outcome, Lease)]
    assert len(winners) == 1, outcomes
    assert winners[0].token == 2
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["LEASE_HELD"] * 7
    acquisitions = [e for e in audit.list_events(page_size=1000).events if e.action == "acquire_lease"]
    assert [json.loads(e.detail_json)["fencing_token"] for e in acquisitions] == [1, 2]
    audit.verify_chain()


@pytest.mark.parametrize(
    "instance", ["co\x00ins", "coins\n", "co\tins", "Coins", "co/ins", "\u00e9", "x" * 64]
)
def test_instance_ids_outside_the_grammar_are_invalid_and_never_stored(
    leases: Leases, heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, instance: str
) -> None:
    """The instance grammar of every service (the enclave creates no other id): a NUL reached
    the database (PostgreSQL refused it: "storage unavailable"; SQLite stored it)."""
    with pytest.raises(InvalidArgumentError):
        take(leases, "node-a", instance=instance)
    with pytest.raises(InvalidArgumentError):
        heads.get(instance)
    links = [enclave.link(instance, ZERO, at(1))]
    with pytest.raises(InvalidArgumentError):
        heads.advance(instance, links, enclave.token(issuer).token, caller=CALLER, fencing_token=0)
    assert leases.list() == []
    assert take(leases, "node-a", instance="co-ins-7").token == 1  # the grammar: a-z, 0-9, "-"


def test_leases_are_listed_a_bounded_page_at_a_time_or_by_instance(leases: Leases) -> None:
    """Rows are never deleted: the whole table in one answer outgrew gRPC's 4 MiB (11k rows),
    and every take-over round and gateway look-up failed with RESOURCE_EXHAUSTED."""
    for index in range(5):
        take(leases, "node-a", instance=f"i-{index}")
    pages, token = [], ""
    while True:
        page = leases.page(page_size=2, page_token=token)
        pages.append([lease.instance_id for lease in page.leases])
        if not (token := page.next_page_token):
            break
    assert pages == [["i-0", "i-1"], ["i-2", "i-3"], ["i-4"]]
    assert [lease.instance_id for lease in leases.page().leases] == [f"i-{i}" for i in range(5)]
    asked = leases.page(instance_ids=["i-3", "i-1", "never", "i-3"])
    assert ([lease.instance_id for lease in asked.leases], asked.next_page_token) == (["i-1", "i-3"], "")
    for bad in (
        {"instance_ids": ["co\x00ins"]},
        {"instance_ids": ["i-1"] * (MAX_LISTED_IDS + 1)},
        {"page_size": -1},
        {"page_token": "not a token"},
        {"page_token": "bGVhc2VzLXYxOg" + "A" * 400},
    ):
        with pytest.raises(InvalidArgumentError):
            leases.page(**bad)
