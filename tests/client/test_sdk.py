"""The SDK over an in-process mesh: typed apps, counters, identities and policy files."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.support import InProcessMesh, token_config
from veil import load_policy
from veil.dev.policies import dev_policy, write_dev_policy
from veil.enclave.measurement import measure_source_tree
from veil.enclave.v1 import envelope_pb2, error_pb2
from veil.sdk.apps import VoteReceipt
from veil.sdk.client import VeilClient
from veil.sdk.counters import FileCounters, MemoryCounters
from veil.sdk.errors import CommandRefused, IdentityError, IntegrityError, OutcomeUnknown, PolicyError
from veil.sdk.identity import AnonymousIdentity, SigningIdentity, load_identity, new_identity, resolve_account
from veil.sdk.trust_policy import ExpectedMeasurement


@pytest.fixture
def admin(mesh: InProcessMesh) -> Iterator[VeilClient]:
    with mesh.connect() as client:
        yield client


def _people(mesh: InProcessMesh) -> tuple[SigningIdentity, SigningIdentity, SigningIdentity]:
    return tuple(new_identity(mesh.data_dir, name) for name in ("alice", "bob", "carol"))  # type: ignore[return-value]


def _config(app: int, scheme: int = envelope_pb2.AUTH_SCHEME_SIGNATURE) -> envelope_pb2.InstanceConfig:
    return envelope_pb2.InstanceConfig(app=app, auth_scheme=scheme)  # type: ignore[arg-type]


def _refusal(error: pytest.ExceptionInfo[CommandRefused]) -> str:
    return error.value.code_name


def test_vault_records_are_owned_shared_revoked_and_deleted(mesh: InProcessMesh, admin: VeilClient) -> None:
    alice, bob, _ = _people(mesh)
    admin.create_instance("records", _config(envelope_pb2.APP_KIND_VAULT))
    mine, theirs = admin.vault("records", alice), admin.vault("records", bob)
    assert mine.put("health", b"blood type 0+") is True
    assert mine.put("health", b"blood type 0-") is False
    with pytest.raises(CommandRefused) as hidden:
        theirs.get("health", owner=alice.account)
    assert _refusal(hidden) in ("PERMISSION_DENIED", "NOT_FOUND")
    mine.share("health", bob.account)
    assert theirs.get("health", owner=alice.account).data == b"blood type 0-"
    assert mine.get("health").readers == (bob.account,)
    mine.revoke("health", bob.account)
    with pytest.raises(CommandRefused):
        theirs.get("health", owner=alice.account)
    mine.delete("health")
    with pytest.raises(CommandRefused) as gone:
        mine.get("health")
    assert _refusal(gone) == "NOT_FOUND"
    assert gone.value.receipt is not None  # the enclave signs what it answered, refusals included
    assert gone.value.receipt.kind == envelope_pb2.RECEIPT_KIND_QUERY


def test_token_balances_and_refusals(mesh: InProcessMesh, admin: VeilClient) -> None:
    alice, bob, carol = _people(mesh)
    admin.create_instance("coins", token_config(alice.public_key))
    issuer = admin.token("coins", alice)
    assert issuer.mint(bob.account, 100) == 100
    wallet = admin.token("coins", bob)
    assert wallet.transfer(carol.account, 40) == 60
    assert (wallet.balance(), admin.token("coins", carol).balance(), wallet.total_supply()) == (60, 40, 100)
    with pytest.raises(CommandRefused) as overdraw:
        wallet.transfer(carol.account, 61)
    assert overdraw.value.receipt is not None  # an app refusal is committed (it consumed the counter)
    with pytest.raises(CommandRefused) as not_issuer:
        wallet.mint(bob.account, 1)
    assert _refusal(not_issuer) == "PERMISSION_DENIED"
    assert wallet.transfer(carol.account, 10) == 50  # counters stayed in step through refusals


def test_ballot_votes_are_verifiably_counted(mesh: InProcessMesh, admin: VeilClient) -> None:
    alice, bob, carol = _people(mesh)
    polls = envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_BALLOT, auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE, ballot_min_votes=2
    )
    admin.create_instance("polls", polls)  # two voters: below the default anonymity set of 3
    chair = admin.ballot("polls", alice)
    chair.create("lunch", "Where do we eat?", ["pizza", "sushi"], [bob.account, carol.account])
    votes = {
        "bob": admin.ballot("polls", bob).vote("lunch", 1),
        "carol": admin.ballot("polls", carol).vote("lunch", 0),
    }
    with pytest.raises(CommandRefused) as ineligible:
        admin.ballot("polls", alice).vote("lunch", 0)
    assert _refusal(ineligible) == "PERMISSION_DENIED"
    with pytest.raises(CommandRefused):
        admin.ballot("polls", bob).tally("lunch")  # not before close
    tally = chair.close("lunch")
    assert (tally.counts, tally.voters) == ((1, 1), 2)
    check = admin.ballot("polls", bob).verify_vote(votes["bob"])
    assert (check.tree_size, check.tally) == (2, tally)
    restored = VoteReceipt.from_json(json.loads(json.dumps(votes["carol"].to_json())))
    assert admin.ballot("polls", carol).verify_vote(restored).tally == tally
    lied = VoteReceipt.from_json({**votes["bob"].to_json(), "option": 0})
    with pytest.raises(IntegrityError, match="recompute"):
        admin.ballot("polls", bob).verify_vote(lied)


def test_anonymous_scheme_accounts(mesh: InProcessMesh, admin: VeilClient) -> None:
    admin.create_instance("notes", _config(envelope_pb2.APP_KIND_VAULT, envelope_pb2.AUTH_SCHEME_NONE))
    with mesh.connect(admin=False) as client:
        guest = client.vault("notes", AnonymousIdentity("guest"))
        guest.put("todo", b"buy milk")
        assert guest.get("todo").data == b"buy milk"
        guest.share("todo", "friend")
        assert (
            client.vault("notes", AnonymousIdentity("friend")).get("todo", owner="guest").data == b"buy milk"
        )
        with pytest.raises(CommandRefused):
            client.vault("notes", AnonymousIdentity("stranger")).get("todo", owner="guest")


def test_signature_scheme_refuses_an_anonymous_identity(mesh: InProcessMesh, admin: VeilClient) -> None:
    admin.create_instance("records", _config(envelope_pb2.APP_KIND_VAULT))
    with pytest.raises(IdentityError):
        admin.vault("records", AnonymousIdentity("guest")).put("x", b"y")
    assert mesh.states[0].calls["Execute"] == 0


def _another_device_minted(mesh: InProcessMesh, times: int) -> tuple[SigningIdentity, SigningIdentity]:
    """Alice's coins instance, where another device (its own counters) minted `times` times."""
    alice, bob, _ = _people(mesh)
    with mesh.connect(counters=MemoryCounters()) as first:
        first.create_instance("coins", token_config(alice.public_key))
        for _ in range(times):
            first.token("coins", alice).mint(bob.account, 1)
    return alice, bob


def test_a_stale_counter_is_resynchronised_from_the_enclave(mesh: InProcessMesh) -> None:
    """Another device used counters 1..3. The enclave's answer to this device's call under
    counter 1 names the command that used counter 3 only: it cannot prove this call did not use
    counter 1 before those (a host can hold sealings and replay), so the call is OutcomeUnknown,
    never sealed again (docs/protocol.md, section 6, step 4). The counter is learnt: the next call
    runs."""
    alice, bob = _another_device_minted(mesh, 3)
    with mesh.connect(counters=MemoryCounters()) as second:  # another device: knows no counter
        with pytest.raises(OutcomeUnknown):
            second.token("coins", alice).mint(bob.account, 1)
        assert second.counters.last("coins", alice.account) == 3
        assert second.token("coins", alice).mint(bob.account, 1) == 4
        assert second.counters.last("coins", alice.account) == 4


def test_a_query_teaches_a_new_device_the_counter_so_its_first_call_runs(mesh: InProcessMesh) -> None:
    """Every query answer carries the account's counter state, sealed to that query: a device
    that knows no counter learns it from a read and seals its first call at the right counter."""
    alice, bob = _another_device_minted(mesh, 3)
    with mesh.connect(counters=MemoryCounters()) as second:  # another device: knows no counter
        second.token("coins", alice).balance()
        assert second.counters.last("coins", alice.account) == 3
        assert second.token("coins", alice).mint(bob.account, 1) == 4


def test_a_counter_used_by_exactly_one_other_command_is_sealed_again(mesh: InProcessMesh) -> None:
    """The one case a counter refusal proves this call never ran: next_counter - 1 is its own
    counter and the enclave names another command there. Then it is sealed again under the next."""
    alice, bob = _another_device_minted(mesh, 1)
    with mesh.connect(counters=MemoryCounters()) as second:  # another device: knows no counter
        assert second.token("coins", alice).mint(bob.account, 1) == 2
        assert second.counters.last("coins", alice.account) == 2


def test_an_enclave_that_forgot_accepted_counters_is_a_rollback(mesh: InProcessMesh) -> None:
    alice, bob, _ = _people(mesh)
    counters = MemoryCounters()
    with mesh.connect(counters=counters) as client:
        client.create_instance("coins", token_config(alice.public_key))
        client.token("coins", alice).mint(bob.account, 1)
        # This client saw counter 5 accepted; an enclave now asking for 2 lost 2..5.
        counters.record("coins", alice.account, 5)
        with pytest.raises(IntegrityError, match="rolled back"):
            client.token("coins", alice).mint(bob.account, 1)
    assert counters.last("coins", alice.account) == 5


def test_counters_persist_in_the_data_dir(mesh: InProcessMesh) -> None:
    alice, bob, _ = _people(mesh)
    with mesh.connect() as client:  # data_dir given: counters.json
        client.create_instance("coins", token_config(alice.public_key))
        client.token("coins", alice).mint(bob.account, 1)
    assert FileCounters(mesh.data_dir / "counters.json").last("coins", alice.account) == 1
    with mesh.connect() as again:
        again.token("coins", alice).mint(bob.account, 1)
    assert mesh.states[0].calls["Execute"] == 2  # no resync round trip was needed


def test_identity_files(tmp_path: Path) -> None:
    alice = new_identity(tmp_path, "alice")
    key_path = tmp_path / "identities" / "alice.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert (tmp_path / "identities" / "alice.pub").read_text().strip() == alice.account
    assert load_identity(tmp_path, "alice").account == alice.account
    assert load_identity(tmp_path, str(key_path)).account == alice.account
    assert resolve_account(tmp_path, "alice") == alice.account
    assert resolve_account(tmp_path, "ab" * 32) == "ab" * 32
    with pytest.raises(IdentityError, match="already exists"):
        new_identity(tmp_path, "alice")
    os.chmod(key_path, 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_identity(tmp_path, "alice")
    with pytest.raises(IdentityError, match="no identity"):
        load_identity(tmp_path, "nobody")
    with pytest.raises(IdentityError):
        new_identity(tmp_path, "../escape")


def test_policy_files(tmp_path: Path) -> None:
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}
    path = write_dev_policy(tmp_path, b"\x07" * 32, jwks)
    policy = load_policy(path)
    assert policy == dev_policy(keyvault_release_key=b"\x07" * 32, jwks=jwks)
    assert policy.mrenclaves == (measure_source_tree(),)
    assert policy.root == "dev"
    assert policy.jwks == jwks  # the sim mesh is evaluated against dev collateral: no "Unevaluated"
    assert "Unevaluated" not in policy.accepted_tcb_statuses
    assert ExpectedMeasurement.for_mrenclave("aa" * 32, jwks=jwks).root == "intel"  # production default
    bad = tmp_path / "bad.json"
    for document, message in (
        ({}, "at least one"),
        ({"mrenclave": "xyz"}, "not hex"),
        ({"mrenclave": "aa"}, "32 bytes"),
        ({"mrenclave": "aa" * 32, "allow_debug": "yes"}, "true or false"),
        ({"mrenclave": "aa" * 32, "surprise": 1}, "unknown"),
    ):
        bad.write_text(json.dumps(document))
        with pytest.raises(PolicyError, match=message):
            load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.json")


def test_unopenable_command_error_is_reported(mesh: InProcessMesh, admin: VeilClient) -> None:
    alice, _, _ = _people(mesh)
    admin.create_instance("coins", token_config(alice.public_key))
    attestation = admin.attest("coins")
    # Pretend the enclave restarted with new keys: the cached attestation is stale.
    stale = attestation.keys.__class__()
    stale.CopyFrom(attestation.keys)
    stale.hpke_x25519_public_key = bytes(range(32))
    object.__setattr__(attestation, "keys", stale)
    assert admin.token("coins", alice).mint(alice.account, 3) == 3  # re-attested and resealed once
    assert error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT  # the refusal code the SDK recovers from


@pytest.mark.parametrize("request_id", ["a" * 65, "\u200b" * 3, "tab\there", "", "zahlung-" + "\u00e9" * 40])
def test_a_request_id_the_gateway_refuses_is_refused_before_anything_is_kept(
    mesh: InProcessMesh, request_id: str
) -> None:
    """A third review: the SDK sealed and kept a call under an id the gateway always refuses
    (INVALID_ARGUMENT); it could never settle, and every later call of the account waited for it.
    A fourth: 48 characters but 88 bytes passed, and the enclave refused the sealed id (over 64
    bytes) unsealed, so the call ran under a fresh id, which a rerun of its own id did not find."""
    alice, bob, _ = _people(mesh)
    with mesh.connect() as client:
        client.create_instance("coins", token_config(alice.public_key))
        with pytest.raises(ValueError, match="bytes of UTF-8"):
            client.token("coins", alice).mint(bob.account, 1, request_id=request_id)
        assert client.calls.pending("coins", alice.account) == []
        assert client.token("coins", alice).mint(bob.account, 1) == 1  # nothing waits
