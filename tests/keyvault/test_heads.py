"""Commit heads: forward-only, signed by the attested enclave key, atomic across replicas."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.keyvault.audit import AuditLog
from services.keyvault.enclave_policy import EnclavePolicy
from services.keyvault.errors import AttestationError, HeadRefusedError, InvalidArgumentError, TokenError
from services.keyvault.heads import CommitHead, CommitHeads, commit_head_message
from services.keyvault.store import Store
from services.keyvault.tokens import DEFAULT_LEEWAY_S, DEFAULT_TOKEN_TTL_S, TokenIssuer, TokenVerifier

from .support import CALLER, FakeClock, FakeEnclave, operator_policy, run_concurrently

INSTANCE = "vault-7"


def h(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def advance(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, sequence: int, fill: int | None = None
) -> CommitHead:
    head_hash = h(sequence if fill is None else fill)
    signature = enclave.sign_head(INSTANCE, sequence, head_hash)
    return heads.advance(INSTANCE, sequence, head_hash, signature, enclave.token(issuer).token, caller=CALLER)


def refusal_reason(audit: AuditLog) -> str:
    event = audit.list_events(page_size=1000).events[-1]
    assert (event.action, event.outcome) == ("advance_commit_head", "refused")
    reason = json.loads(event.detail_json)["reason"]
    assert isinstance(reason, str)
    return reason


def test_message_encoding_is_exact() -> None:
    message = commit_head_message("vault-7", 258, b"\xab" * 32)
    assert message == (
        b"veil/commit-head/v1" + b"\x00\x07" + b"vault-7" + b"\x00\x00\x00\x00\x00\x00\x01\x02" + b"\xab" * 32
    )
    assert commit_head_message("é", 1, bytes(32))[19:21] == b"\x00\x02"  # length of the UTF-8 bytes
    for bad in (("", 1, bytes(32)), ("x", -1, bytes(32)), ("x", 1, bytes(31)), ("x" * 257, 1, bytes(32))):
        with pytest.raises(InvalidArgumentError):
            commit_head_message(*bad)


def test_heads_move_forward_only(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    assert heads.get(INSTANCE) is None
    first = advance(heads, issuer, enclave, 1)
    assert (first.sequence, first.hash, first.signing_public_key) == (1, h(1), enclave.signing_public_bytes)
    advance(heads, issuer, enclave, 5)
    again = advance(heads, issuer, enclave, 5)  # same sequence, same hash: idempotent
    assert again.sequence == 5
    with pytest.raises(HeadRefusedError, match="rollback") as rollback:
        advance(heads, issuer, enclave, 4)
    assert rollback.value.reason == "COMMIT_HEAD_ROLLBACK"
    assert refusal_reason(audit) == "COMMIT_HEAD_ROLLBACK"
    with pytest.raises(HeadRefusedError, match="fork") as fork:
        advance(heads, issuer, enclave, 5, fill=99)
    assert fork.value.reason == "COMMIT_HEAD_FORK"
    assert refusal_reason(audit) == "COMMIT_HEAD_FORK"
    stored = heads.get(INSTANCE)
    assert stored is not None
    assert (stored.sequence, stored.hash) == (5, h(5))
    allowed = [e for e in audit.list_events().events if e.outcome == "allowed"]
    assert [json.loads(e.detail_json)["sequence"] for e in allowed] == [1, 5]


def test_signature_must_come_from_the_attested_key(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    intruder = FakeEnclave()
    token = enclave.token(issuer).token
    forged = intruder.sign_head(INSTANCE, 1, h(1))
    with pytest.raises(HeadRefusedError) as caught:
        heads.advance(INSTANCE, 1, h(1), forged, token, caller=CALLER)
    assert caught.value.reason == "COMMIT_HEAD_BAD_SIGNATURE"
    assert refusal_reason(audit) == "COMMIT_HEAD_BAD_SIGNATURE"
    # A valid signature over other fields does not transfer.
    good = enclave.sign_head(INSTANCE, 1, h(1))
    for instance, sequence, head_hash in (("other", 1, h(1)), (INSTANCE, 2, h(1)), (INSTANCE, 1, h(2))):
        with pytest.raises(HeadRefusedError):
            heads.advance(instance, sequence, head_hash, good, enclave.token(issuer).token, caller=CALLER)
    assert heads.get(INSTANCE) is None


def test_token_is_required_and_checked(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog, clock: FakeClock
) -> None:
    signature = enclave.sign_head(INSTANCE, 1, h(1))
    with pytest.raises(TokenError):
        heads.advance(INSTANCE, 1, h(1), signature, "not-a-token", caller=CALLER)
    assert refusal_reason(audit) == "INVALID_TOKEN"
    token = enclave.token(issuer).token
    clock.advance(DEFAULT_TOKEN_TTL_S + DEFAULT_LEEWAY_S + 1)
    with pytest.raises(TokenError, match="expired"):
        heads.advance(INSTANCE, 1, h(1), signature, token, caller=CALLER)
    # Runtime data not bound by the report data is refused before the key is trusted.
    mismatched = issuer.issue(
        enclave.quote(b"n1"), runtime_data=FakeEnclave().runtime_data, nonce=b"n1", quote_hash=bytes(32)
    )
    with pytest.raises(AttestationError):
        heads.advance(INSTANCE, 1, h(1), signature, mismatched.token, caller=CALLER)


def test_token_may_be_reused_for_heads(heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave) -> None:
    token = enclave.token(issuer).token
    for sequence in (1, 2, 3):
        signature = enclave.sign_head(INSTANCE, sequence, h(sequence))
        heads.advance(INSTANCE, sequence, h(sequence), signature, token, caller=CALLER)


def test_restarted_enclave_with_new_keys_moves_forward(
    heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    advance(heads, issuer, enclave, 10)
    restarted = FakeEnclave()  # same measurement, fresh keys after a restart
    with pytest.raises(HeadRefusedError, match="rollback"):
        advance(heads, issuer, restarted, 9)
    stored = advance(heads, issuer, restarted, 11)
    assert stored.signing_public_key == restarted.signing_public_bytes
    current = heads.get(INSTANCE)
    assert current is not None
    assert current.signing_public_key == restarted.signing_public_bytes


def test_operator_policy_restricts_who_may_advance(
    store: Store, audit: AuditLog, verifier: TokenVerifier, clock: FakeClock, issuer: TokenIssuer
) -> None:
    # More in test_enclave_policy.py; here: a policy other than the fixture's, and its debug gate.
    other_build = FakeEnclave(mrenclave=b"\x99" * 32)
    guarded = CommitHeads(store, audit, verifier, clock, enclave_policy=operator_policy(other_build))
    advance(guarded, issuer, other_build, 1)
    with pytest.raises(HeadRefusedError) as other:
        advance(guarded, issuer, FakeEnclave(), 2)
    assert other.value.reason == "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"
    assert refusal_reason(audit) == "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"
    with pytest.raises(HeadRefusedError, match="debuggable"):
        advance(guarded, issuer, FakeEnclave(mrenclave=b"\x99" * 32, debug=True), 2)


def test_sequence_bounds(heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave) -> None:
    for sequence in (0, 2**63):
        with pytest.raises(InvalidArgumentError):
            advance(heads, issuer, enclave, sequence, fill=1)
    assert advance(heads, issuer, enclave, 2**63 - 1, fill=1).sequence == 2**63 - 1


def test_concurrent_advances_from_two_replicas(
    heads: CommitHeads,
    replica: Store,
    verifier: TokenVerifier,
    clock: FakeClock,
    issuer: TokenIssuer,
    enclave: FakeEnclave,
    audit: AuditLog,
    enclave_policy: EnclavePolicy,
) -> None:
    other = CommitHeads(replica, AuditLog(replica, clock), verifier, clock, enclave_policy=enclave_policy)
    replicas = [heads, other]
    tokens = [enclave.token(issuer).token for _ in range(8)]

    def race(index: int) -> str:
        sequence = 3 + index % 2  # two competing sequences, several writers each
        head_hash = h(100 + index)  # every writer has its own hash
        signature = enclave.sign_head(INSTANCE, sequence, head_hash)
        try:
            replicas[index % 2].advance(
                INSTANCE, sequence, head_hash, signature, tokens[index], caller=CALLER
            )
        except HeadRefusedError as exc:
            return exc.reason
        return "ok"

    outcomes = run_concurrently(8, race)
    # Each sequence is won at most once; losers see a fork or a rollback.
    assert 1 <= outcomes.count("ok") <= 2
    assert set(outcomes) <= {"ok", "COMMIT_HEAD_FORK", "COMMIT_HEAD_ROLLBACK"}
    final = heads.get(INSTANCE)
    assert final is not None
    assert final.sequence in (3, 4)
    assert audit.verify_chain() == 8
