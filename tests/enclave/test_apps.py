"""Each app's rules, exercised end to end through sealed commands."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.enclave.support import Harness, ballot, config, error_code, token, vault
from veil.enclave import wire
from veil.enclave.apps import merkle
from veil.enclave.v1 import apps_pb2, envelope_pb2

VAULT = config(envelope_pb2.APP_KIND_VAULT)
BALLOT = config(envelope_pb2.APP_KIND_BALLOT)


# --- vault -------------------------------------------------------------------------------------


def test_vault_owner_puts_gets_shares_revokes_and_deletes(harness: Harness) -> None:
    harness.create("v", VAULT)
    alice = harness.client("v", account="alice")
    bob = harness.client("v", account="bob")

    put = harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="passport", data=b"P123")))
    assert put.result.vault.put.created
    assert not harness.call(
        alice, vault(put=apps_pb2.VaultPut(record_id="passport", data=b"P456"))
    ).result.vault.put.created

    got = harness.query(alice, vault(get=apps_pb2.VaultGet(owner="alice", record_id="passport")))
    assert got.result.vault.get.data == b"P456"

    bob_get = vault(get=apps_pb2.VaultGet(owner="alice", record_id="passport"))
    assert error_code(harness.query(bob, bob_get)) == "NOT_FOUND"  # same answer as a missing record
    assert (
        error_code(harness.query(bob, vault(get=apps_pb2.VaultGet(owner="alice", record_id="x"))))
        == "NOT_FOUND"
    )

    harness.call(alice, vault(share=apps_pb2.VaultShare(record_id="passport", reader="bob")))
    shared = harness.query(bob, bob_get)
    assert shared.result.vault.get.data == b"P456"
    assert list(shared.result.vault.get.readers) == []  # only the owner sees the readers
    assert list(harness.query(alice, bob_get).result.vault.get.readers) == ["bob"]

    # Only the owner shares: bob "sharing" alice's record id acts on his own (absent) record.
    assert (
        error_code(harness.call(bob, vault(share=apps_pb2.VaultShare(record_id="passport", reader="eve"))))
        == "NOT_FOUND"
    )

    harness.call(alice, vault(revoke=apps_pb2.VaultRevoke(record_id="passport", reader="bob")))
    assert error_code(harness.query(bob, bob_get)) == "NOT_FOUND"

    harness.call(alice, vault(delete=apps_pb2.VaultDelete(record_id="passport")))
    assert error_code(harness.query(alice, bob_get)) == "NOT_FOUND"


def test_vault_delete_erases_from_later_snapshots(harness: Harness) -> None:
    harness.create("v", VAULT)
    alice = harness.client("v")
    secret = b"very-identifying-data-" + secrets.token_bytes(8)
    harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="r", data=secret)))
    harness.call(alice, vault(delete=apps_pb2.VaultDelete(record_id="r")))
    snapshot = harness.host.snapshot("v")
    from veil.enclave import crypto

    aad = wire.snapshot_aad("v", snapshot.head.sequence, snapshot.head.hash, snapshot.key_version)
    plaintext = crypto.aead_open(harness.data_keys[("v", 1)], snapshot.nonce, snapshot.ciphertext, aad)
    assert secret not in plaintext
    assert b"vault" not in plaintext  # no trace of the record key either


# --- token -------------------------------------------------------------------------------------


@pytest.fixture
def token_harness(harness: Harness) -> tuple[Harness, ed25519.Ed25519PrivateKey]:
    issuer = ed25519.Ed25519PrivateKey.generate()
    issuer_public = issuer.public_key().public_bytes_raw()
    harness.create(
        "t",
        config(
            envelope_pb2.APP_KIND_TOKEN,
            envelope_pb2.AUTH_SCHEME_SIGNATURE,
            token_issuer_public_key=issuer_public,
        ),
    )
    return harness, issuer


def test_token_mint_transfer_balance_supply(token_harness: tuple[Harness, ed25519.Ed25519PrivateKey]) -> None:
    harness, issuer_key = token_harness
    issuer = harness.client("t", signer=issuer_key)
    alice = harness.client("t", signer=ed25519.Ed25519PrivateKey.generate())
    bob = harness.client("t", signer=ed25519.Ed25519PrivateKey.generate())

    assert (
        harness.call(
            issuer, token(mint=apps_pb2.TokenMint(to=alice.identity, amount=100))
        ).result.token.mint.amount
        == 100
    )
    assert (
        error_code(harness.call(alice, token(mint=apps_pb2.TokenMint(to=alice.identity, amount=5))))
        == "PERMISSION_DENIED"
    )

    sent = harness.call(alice, token(transfer=apps_pb2.TokenTransfer(to=bob.identity, amount=30)))
    assert sent.result.token.transfer.amount == 70
    overdraft = harness.call(alice, token(transfer=apps_pb2.TokenTransfer(to=bob.identity, amount=71)))
    assert error_code(overdraft) == "FAILED_PRECONDITION"
    assert (
        error_code(harness.call(alice, token(transfer=apps_pb2.TokenTransfer(to=bob.identity, amount=0))))
        == "INVALID_ARGUMENT"
    )

    assert harness.query(alice, token(balance=apps_pb2.TokenBalance())).result.token.balance.amount == 70
    assert harness.query(bob, token(balance=apps_pb2.TokenBalance())).result.token.balance.amount == 30
    assert (
        harness.query(bob, token(total_supply=apps_pb2.TokenTotalSupply())).result.token.total_supply.amount
        == 100
    )


def test_token_app_requires_signature_scheme_and_issuer_key(harness: Harness) -> None:
    from veil.services.state.enclave_host import EnclaveCallError

    harness.provision("t2")
    with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT"):
        harness.create_raw("t2", config(envelope_pb2.APP_KIND_TOKEN, envelope_pb2.AUTH_SCHEME_SIGNATURE))
    with pytest.raises(EnclaveCallError, match="AUTH_SCHEME_SIGNATURE"):
        harness.create_raw(
            "t2",
            config(
                envelope_pb2.APP_KIND_TOKEN, envelope_pb2.AUTH_SCHEME_NONE, token_issuer_public_key=bytes(32)
            ),
        )


# --- ballot ------------------------------------------------------------------------------------


def _create_ballot(harness: Harness, voters: list[str]) -> None:
    harness.create("b", BALLOT)
    creator = harness.client("b", account="chair")
    created = harness.call(
        creator,
        ballot(
            create=apps_pb2.BallotCreate(
                ballot_id="q1", question="Lunch?", options=["pizza", "sushi", "salad"], eligible_voters=voters
            )
        ),
    )
    assert error_code(created) == "OK"


def test_ballot_secret_vote_replace_close_tally_and_inclusion_proofs(harness: Harness) -> None:
    _create_ballot(harness, ["ann", "ben", "cat"])
    chair = harness.client("b", account="chair", counter=1)
    voters = {name: harness.client("b", account=name) for name in ("ann", "ben", "cat")}
    salts = {name: secrets.token_bytes(32) for name in voters}
    choices = {"ann": 0, "ben": 1, "cat": 1}

    first = harness.call(
        voters["ann"], ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=2, salt=salts["ann"]))
    )
    assert error_code(first) == "OK"
    receipts = {}
    for name, option in choices.items():  # ann's second vote replaces her first
        result = harness.call(
            voters[name], ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=option, salt=salts[name]))
        )
        receipts[name] = result.result.ballot.vote.commitment
        assert result.result.ballot.vote.replaced == (name == "ann")
        assert receipts[name] == wire.vote_commitment("q1", name, option, salts[name])

    outsider = harness.client("b", account="mallory")
    denied = harness.call(
        outsider, ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=0, salt=salts["ann"]))
    )
    assert error_code(denied) == "PERMISSION_DENIED"
    assert (
        error_code(harness.query(chair, ballot(tally=apps_pb2.BallotTally(ballot_id="q1"))))
        == "FAILED_PRECONDITION"
    )
    assert (
        error_code(harness.query(voters["ann"], ballot(proof=apps_pb2.BallotProof(ballot_id="q1"))))
        == "FAILED_PRECONDITION"
    )
    assert (
        error_code(harness.call(voters["ann"], ballot(close=apps_pb2.BallotClose(ballot_id="q1"))))
        == "PERMISSION_DENIED"
    )

    closed = harness.call(chair, ballot(close=apps_pb2.BallotClose(ballot_id="q1")))
    tally = closed.result.ballot.close
    assert list(tally.counts) == [1, 2, 0]
    assert tally.voters == 3
    assert (
        harness.query(outsider, ballot(tally=apps_pb2.BallotTally(ballot_id="q1"))).result.ballot.tally
        == tally
    )
    late = harness.call(
        voters["ben"], ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=0, salt=salts["ben"]))
    )
    assert error_code(late) == "FAILED_PRECONDITION"

    for name, voter in voters.items():  # each voter checks their own ballot is counted
        proof = harness.query(voter, ballot(proof=apps_pb2.BallotProof(ballot_id="q1"))).result.ballot.proof
        assert proof.commitment == receipts[name]
        assert proof.merkle_root == tally.merkle_root
        assert merkle.verify_inclusion(
            proof.commitment, proof.leaf_index, proof.tree_size, list(proof.path), tally.merkle_root
        )
        assert sum(tally.counts) == proof.tree_size
    assert (
        error_code(harness.query(outsider, ballot(proof=apps_pb2.BallotProof(ballot_id="q1")))) == "NOT_FOUND"
    )


def test_ballot_votes_are_erased_at_close(harness: Harness) -> None:
    _create_ballot(harness, [])
    chair = harness.client("b", account="chair", counter=1)
    salt = b"S" * 32
    harness.call(
        harness.client("b", account="ann"),
        ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=1, salt=salt)),
    )
    for name in ("ben", "cat"):  # the default anonymity set is 3 votes
        harness.call(
            harness.client("b", account=name),
            ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=0, salt=secrets.token_bytes(32))),
        )
    closed = harness.call(chair, ballot(close=apps_pb2.BallotClose(ballot_id="q1")))
    assert error_code(closed) == "OK"
    snapshot = harness.host.snapshot("b")
    from veil.enclave import crypto

    aad = wire.snapshot_aad("b", snapshot.head.sequence, snapshot.head.hash, snapshot.key_version)
    plaintext = crypto.aead_open(harness.data_keys[("b", 1)], snapshot.nonce, snapshot.ciphertext, aad)
    assert salt not in plaintext  # option and salt are gone; only the commitment stays


def test_ballot_info_and_validation(harness: Harness) -> None:
    _create_ballot(harness, [])
    chair = harness.client("b", account="chair", counter=1)
    info = harness.query(chair, ballot(info=apps_pb2.BallotInfo(ballot_id="q1"))).result.ballot.info
    assert info.question == "Lunch?"
    assert info.open_to_all
    assert not info.closed
    assert info.creator == "chair"
    assert info.min_votes == 3  # the enclave's default anonymity set
    dup = harness.call(
        chair, ballot(create=apps_pb2.BallotCreate(ballot_id="q1", question="?", options=["a", "b"]))
    )
    assert error_code(dup) == "ALREADY_EXISTS"
    one = harness.call(
        chair, ballot(create=apps_pb2.BallotCreate(ballot_id="q2", question="?", options=["a"]))
    )
    assert error_code(one) == "INVALID_ARGUMENT"
    bad = harness.call(chair, ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=9, salt=b"s" * 16)))
    assert error_code(bad) == "INVALID_ARGUMENT"
    short_salt = harness.call(chair, ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=0, salt=b"s")))
    assert error_code(short_salt) == "INVALID_ARGUMENT"
    no_option = harness.call(chair, ballot(vote=apps_pb2.BallotVote(ballot_id="q1", salt=b"s" * 16)))
    assert error_code(no_option) == "INVALID_ARGUMENT"  # an implicit 0 would seal 2 bytes shorter


def test_every_option_looks_the_same_to_the_host(harness: Harness) -> None:
    """Sealed command, log entry, answer and state growth: one size whatever the option (option 0
    once sealed and stored 2 bytes shorter, and told a host that saw who sent it the vote)."""
    _create_ballot(harness, [])
    first = harness.client("b", account="voter-f")  # the first vote also starts the voter count
    harness.call(first, ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=1, salt=b"s" * 32)))
    seen = set()
    for option in (0, 1, 2):
        voter = harness.client("b", account=f"voter-{option}")
        used = harness.host.get_status().memory_used_bytes
        sealed = voter.seal(ballot(vote=apps_pb2.BallotVote(ballot_id="q1", option=option, salt=b"s" * 32)))
        (outcome,) = harness.run("b", sealed)
        assert error_code(voter.read(sealed, outcome)) == "OK"
        grown = harness.host.get_status().memory_used_bytes - used
        sizes = (
            len(sealed.command.ciphertext),
            len(harness.log["b"][-1].ciphertext),
            len(outcome.sealed_response),
        )
        seen.add((sizes, grown))
    assert len(seen) == 1, seen


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_merkle_inclusion_proofs_verify_only_for_their_leaf(size: int) -> None:
    leaves = sorted(secrets.token_bytes(32) for _ in range(size))
    root = merkle.root(leaves)
    for index, leaf in enumerate(leaves):
        path = merkle.inclusion_path(index, leaves)
        assert merkle.verify_inclusion(leaf, index, size, path, root)
        assert not merkle.verify_inclusion(bytes([leaf[0] ^ 1]) + leaf[1:], index, size, path, root)
        if size > 1:
            assert not merkle.verify_inclusion(leaf, (index + 1) % size, size, path, root)


def test_queries_are_read_only_and_carry_query_receipts(harness: Harness) -> None:
    harness.create("v", VAULT)
    alice = harness.client("v")
    harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="r", data=b"1")))
    before = harness.enclave.state_digest()
    write = harness.query(alice, vault(put=apps_pb2.VaultPut(record_id="r", data=b"2")))
    assert error_code(write) == "INVALID_ARGUMENT"
    assert "read-only" in write.error.message
    assert harness.enclave.state_digest() == before
    got = harness.query(alice, vault(get=apps_pb2.VaultGet(owner="alice", record_id="r")))
    assert got.result.vault.get.data == b"1"
    receipt = alice.receipts[-1]
    assert receipt.kind == envelope_pb2.RECEIPT_KIND_QUERY
    assert receipt.sequence == 2  # the head the query read
    wrong_app = harness.query(alice, token(balance=apps_pb2.TokenBalance()))
    assert error_code(wrong_app) == "INVALID_ARGUMENT"
