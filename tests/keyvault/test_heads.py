"""Commit heads: moved only along links the attested enclave signed, from the stored head, with the
registered genesis; statements for one enclave challenge; atomic across replicas."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.errors import (
    AttestationRefusedError,
    HeadRefusedError,
    InvalidArgumentError,
    TokenRefusedError,
    TokenReplayError,
)
from veil.services.keyvault.heads import CommitHead, CommitHeads
from veil.services.keyvault.keys import KeyManager
from veil.services.keyvault.store import Store
from veil.services.keyvault.tokens import DEFAULT_TOKEN_TTL_S, TokenIssuer
from veil.verify.tokens import DEFAULT_LEEWAY_S

from .support import (
    ADMIN,
    CALLER,
    GENESIS,
    RELEASE_PUBLIC_KEY,
    FakeClock,
    FakeEnclave,
    measurement_policy,
    operator_policy,
    run_concurrently,
)

INSTANCE = "vault-7"
ZERO = (0, wire.ZERO_HASH)


def h(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def at(n: int) -> tuple[int, bytes]:
    return (n, h(n))


def advance(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, *path: tuple[int, bytes], **link: bytes
) -> CommitHead:
    """Advance along `path` (base, head1, head2, ...) with links signed by `enclave`."""
    links = [enclave.link(INSTANCE, path[i], path[i + 1], **link) for i in range(len(path) - 1)]
    head, enclave_key = heads.advance(INSTANCE, links, enclave.token(issuer).token, caller=CALLER)
    assert enclave_key == enclave.signing_public_bytes
    return head


def refusal_reason(audit: AuditLog) -> str:
    event = audit.list_events(page_size=1000).events[-1]
    assert (event.action, event.outcome) == ("advance_commit_head", "refused")
    reason = json.loads(event.detail_json)["reason"]
    assert isinstance(reason, str)
    return reason


def test_heads_register_then_move_forward_only_from_the_stored_head(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    assert heads.get(INSTANCE) is None
    with pytest.raises(HeadRefusedError) as unknown:  # no registration: the first link must be from 0
        advance(heads, issuer, enclave, at(1), at(2))
    assert unknown.value.reason == "COMMIT_HEAD_UNKNOWN_INSTANCE"
    first = advance(heads, issuer, enclave, ZERO, at(1))
    assert (first.sequence, first.hash, first.genesis_hash) == (1, h(1), GENESIS)
    assert first.signing_public_key == enclave.signing_public_bytes
    advance(heads, issuer, enclave, at(1), at(3), at(5))  # a path of two links
    again = advance(heads, issuer, enclave, at(3), at(5))  # ends at the stored head: idempotent
    assert again.sequence == 5
    with pytest.raises(HeadRefusedError, match="rollback") as rollback:
        advance(heads, issuer, enclave, at(1), at(4))
    assert rollback.value.reason == refusal_reason(audit) == "COMMIT_HEAD_ROLLBACK"
    # A fork: a link from an older head to past the stored one, or another hash at 5.
    for path in ((at(3), at(9)), (at(3), (5, h(99))), ((5, h(98)), at(6))):
        with pytest.raises(HeadRefusedError, match="fork") as fork:
            advance(heads, issuer, enclave, *path)
        assert fork.value.reason == refusal_reason(audit) == "COMMIT_HEAD_FORK"
    # A re-registration of the instance (a second creation) is a fork too.
    with pytest.raises(HeadRefusedError) as second:
        advance(heads, issuer, enclave, ZERO, at(9), genesis_hash=h(77))
    assert second.value.reason == "COMMIT_HEAD_FORK"
    stored = heads.get(INSTANCE)
    assert stored is not None
    assert (stored.sequence, stored.hash) == (5, h(5))
    allowed = [e for e in audit.list_events().events if e.outcome == "allowed"]
    assert [json.loads(e.detail_json)["sequence"] for e in allowed] == [1, 5]


def test_another_genesis_never_moves_a_registered_head(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    """The fork takeover: a second creation of the id, padded past the head, is refused."""
    advance(heads, issuer, enclave, ZERO, at(1), at(2))
    for change in ({"genesis_hash": h(50)}, {"config_hash": h(51)}):
        with pytest.raises(HeadRefusedError, match="genesis differs") as caught:
            advance(heads, issuer, enclave, at(2), at(1000), **change)
        assert caught.value.reason == "COMMIT_HEAD_FORK"
    stored = heads.get(INSTANCE)
    assert stored is not None
    assert stored.sequence == 2


def test_links_must_come_from_the_attested_key_and_be_well_formed(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    token = enclave.token(issuer).token
    forged = FakeEnclave().link(INSTANCE, ZERO, at(1))
    with pytest.raises(HeadRefusedError) as caught:
        heads.advance(INSTANCE, [forged], token, caller=CALLER)
    assert caught.value.reason == refusal_reason(audit) == "COMMIT_HEAD_BAD_SIGNATURE"
    # A valid signature does not transfer to other fields.
    good = enclave.link(INSTANCE, ZERO, at(1))
    for field, value in (("head", (2, h(1))), ("head", (1, h(2))), ("base", (0, h(3)))):
        tampered = envelope_pb2.CommitLink()
        tampered.CopyFrom(good)
        getattr(tampered, field).CopyFrom(envelope_pb2.CommitHead(sequence=value[0], hash=value[1]))
        with pytest.raises(HeadRefusedError):
            heads.advance(INSTANCE, [tampered], token, caller=CALLER)
    relabelled = envelope_pb2.CommitLink()
    relabelled.CopyFrom(good)
    relabelled.instance_id = "other"
    with pytest.raises(HeadRefusedError):
        heads.advance("other", [relabelled], token, caller=CALLER)
    malformed = [
        [],
        [good, enclave.link(INSTANCE, at(2), at(3))],  # not consecutive
        [enclave.link("other", ZERO, at(1))],  # another instance than the request's
        [enclave.link(INSTANCE, at(2), at(2))],  # does not move forward
        [enclave.link(INSTANCE, at(1), (2**63, h(1)))],  # beyond the 64-bit signed range
        [good, enclave.link(INSTANCE, at(1), at(2), genesis_hash=h(9))],  # two geneses
    ]
    for links in malformed:
        with pytest.raises(InvalidArgumentError):
            heads.advance(INSTANCE, links, token, caller=CALLER)
    assert heads.get(INSTANCE) is None


def test_token_is_required_and_checked(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog, clock: FakeClock
) -> None:
    link = enclave.link(INSTANCE, ZERO, at(1))
    with pytest.raises(TokenRefusedError):
        heads.advance(INSTANCE, [link], "not-a-token", caller=CALLER)
    assert refusal_reason(audit) == "INVALID_TOKEN"
    token = enclave.token(issuer).token
    clock.advance(DEFAULT_TOKEN_TTL_S + DEFAULT_LEEWAY_S + 1)
    with pytest.raises(TokenRefusedError, match="expired"):
        heads.advance(INSTANCE, [link], token, caller=CALLER)
    # Runtime data not bound by the report data is refused before the key is trusted.
    nonce = b"n" * 32
    mismatched = issuer.issue(
        enclave.quote(nonce), runtime_data=FakeEnclave().runtime_data, nonce=nonce, quote_hash=bytes(32)
    )
    with pytest.raises(AttestationRefusedError):
        heads.advance(INSTANCE, [link], mismatched.token, caller=CALLER)
    assert heads.get(INSTANCE) is None


def test_one_token_serves_many_advances_and_still_one_key_release(
    heads: CommitHeads, keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    """Advances verify the token but do not consume it; a key release consumes it, once."""
    token = enclave.token(issuer).token
    heads.advance(INSTANCE, [enclave.link(INSTANCE, ZERO, at(1))], token, caller=CALLER)
    for sequence in (2, 3):
        link = enclave.link(INSTANCE, at(sequence - 1), at(sequence))
        assert heads.advance(INSTANCE, [link], token, caller=CALLER)[0].sequence == sequence
    stored = heads.get(INSTANCE)
    assert stored is not None
    assert (stored.sequence, stored.hash, stored.signing_public_key) == (
        3,
        h(3),
        enclave.signing_public_bytes,
    )
    keys.create("orders", measurement_policy(), caller=ADMIN)
    assert keys.release(token, "orders", caller=CALLER).version == 1  # three advances later: unused
    with pytest.raises(TokenReplayError):
        keys.release(token, "orders", caller=CALLER)
    link = enclave.link(INSTANCE, at(3), at(4))  # spent for releases, still good for heads
    assert heads.advance(INSTANCE, [link], token, caller=CALLER)[0].sequence == 4


def test_restarted_enclave_with_new_keys_moves_forward(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    advance(heads, issuer, enclave, ZERO, at(10))
    restarted = FakeEnclave()  # same measurement, fresh keys after a restart (and a Restore at 10)
    with pytest.raises(HeadRefusedError, match="rollback"):
        advance(heads, issuer, restarted, at(8), at(9))
    stored = advance(heads, issuer, restarted, at(10), at(11))
    assert stored.signing_public_key == restarted.signing_public_bytes


def test_statements_bind_the_enclave_challenge_and_expire(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, clock: FakeClock
) -> None:
    key, challenge = enclave.signing_public_bytes, b"c" * 32
    absent = heads.statement(INSTANCE, key, challenge)
    assert (absent.head.sequence, absent.genesis_hash, absent.config_hash) == (0, b"", b"")
    assert absent.not_after_unix_ms == int((clock() + 30) * 1000)
    assert wire.verify_ed25519(RELEASE_PUBLIC_KEY, absent.signature, wire.head_statement_bytes(absent))
    advance(heads, issuer, enclave, ZERO, at(1), at(4))
    stated = heads.statement(INSTANCE, key, challenge)
    assert (stated.head.sequence, stated.head.hash, stated.genesis_hash) == (4, h(4), GENESIS)
    assert (stated.challenge, stated.enclave_signing_public_key) == (challenge, key)
    assert wire.verify_ed25519(RELEASE_PUBLIC_KEY, stated.signature, wire.head_statement_bytes(stated))
    for bad_key, bad_challenge in ((b"k" * 31, challenge), (key, b"c" * 31), (key, b"")):
        with pytest.raises(InvalidArgumentError):
            heads.statement(INSTANCE, bad_key, bad_challenge)


def test_confirmations_are_signed_by_the_release_key_for_the_asking_boot(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    head = advance(heads, issuer, enclave, ZERO, at(3))
    key = enclave.signing_public_bytes
    confirmation = heads.confirmation(head, key)
    assert confirmation.enclave_signing_public_key == key
    message = wire.head_confirmation_bytes(INSTANCE, 3, h(3), key)
    assert wire.verify_ed25519(RELEASE_PUBLIC_KEY, confirmation.signature, message)
    # An idempotent repeat by another boot is confirmed to that boot, not to the first one.
    later = FakeEnclave()
    repeat, later_key = heads.advance(
        INSTANCE, [later.link(INSTANCE, at(1), at(3))], later.token(issuer).token, caller=CALLER
    )
    assert (repeat.sequence, later_key) == (3, later.signing_public_bytes)


def test_operator_policy_restricts_who_may_advance(deps: Deps, audit: AuditLog, issuer: TokenIssuer) -> None:
    # More in test_enclave_policy.py; here: a policy other than the fixture's, and its debug gate.
    other_build = FakeEnclave(mrenclave=b"\x99" * 32)
    guarded = CommitHeads(replace(deps, enclave_policy=operator_policy(other_build)))
    advance(guarded, issuer, other_build, ZERO, at(1))
    with pytest.raises(HeadRefusedError) as other:
        advance(guarded, issuer, FakeEnclave(), at(1), at(2))
    assert other.value.reason == refusal_reason(audit) == "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"
    with pytest.raises(HeadRefusedError, match="debuggable"):
        advance(guarded, issuer, FakeEnclave(mrenclave=b"\x99" * 32, debug=True), at(1), at(2))


def test_sequence_bounds(heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave) -> None:
    with pytest.raises(InvalidArgumentError):
        advance(heads, issuer, enclave, ZERO, (2**63, h(1)))
    assert advance(heads, issuer, enclave, ZERO, (2**63 - 1, h(1))).sequence == 2**63 - 1


def test_concurrent_advances_from_two_replicas(
    heads: CommitHeads,
    deps: Deps,
    replica: Store,
    clock: FakeClock,
    issuer: TokenIssuer,
    enclave: FakeEnclave,
    audit: AuditLog,
) -> None:
    other = CommitHeads(replace(deps, store=replica, audit=AuditLog(replica, clock)))
    advance(heads, issuer, enclave, ZERO, at(2))
    replicas = [heads, other]
    tokens = [enclave.token(issuer).token for _ in range(8)]

    def race(index: int) -> str:
        # Every writer extends the stored head 2 with its own hash: exactly one may win.
        link = enclave.link(INSTANCE, at(2), (3 + index % 2, h(100 + index)))
        try:
            replicas[index % 2].advance(INSTANCE, [link], tokens[index], caller=CALLER)
        except HeadRefusedError as exc:
            return exc.reason
        return "ok"

    outcomes = run_concurrently(8, race)
    assert outcomes.count("ok") == 1
    assert set(outcomes) <= {"ok", "COMMIT_HEAD_FORK", "COMMIT_HEAD_ROLLBACK"}
    final = heads.get(INSTANCE)
    assert final is not None
    assert final.sequence in (3, 4)
    assert audit.verify_chain() == 9


def test_an_advance_that_asks_for_hold_keys_says_so_in_its_audit_event(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    """Hold keys go out with the advance's answer (hold_keys.py): its audit event names the key
    version they are derived from, so an auditor knows which heads' keys the host may hold."""
    advance(heads, issuer, enclave, ZERO, at(1))
    links = [enclave.link(INSTANCE, at(1), at(2))]
    heads.advance(INSTANCE, links, enclave.token(issuer).token, caller=CALLER, hold_key_version=3)
    events = audit.list_events(page_size=1000).events
    details = [json.loads(e.detail_json) for e in events if e.action == "advance_commit_head"]
    assert "hold_key_version" not in details[0]  # the registration asked for none
    assert (details[-1]["sequence"], details[-1]["hold_key_version"]) == (2, 3)
