"""The host as the adversary (issue 11): one test per break an outside review found, each driving
the real enclave and the real keyvault (or the real SDK through a hostile gateway) the way a host
that controls the state process, its database, the runner pipe and the gateway would.

Each test performs the attack and checks both that it is refused and that the attacker learned
nothing from trying: no data key, no vote, no second execution. docs/security.md names these
tests row by row.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.attack.hostile_host import EnclaveBoot, now_ms
from tests.attack.mesh import TIMEOUT, RunningKeyvault
from tests.client.evil_gateway import EvilGateway, evil_gateway
from tests.enclave.support import KEYVAULT_RELEASE_KEY, ballot, config, error_code, head_statement, token
from tests.gateway.support import InProcessMesh, fake_mesh_policy, mesh_fixture, token_config
from veil.enclave import wire
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.sdk.calls import MemoryCalls
from veil.sdk.client import VeilClient, connect
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import GatewayError, IdentityError, IntegrityError, OutcomeUnknown
from veil.sdk.identity import SigningIdentity, new_identity
from veil.sdk.pins import InstancePins
from veil.services.common.errors import InvalidArgument, Unavailable, abort
from veil.services.state.enclave_host import EnclaveCallError
from veil.status import error_info
from veil.verify.bundle import verify_bundle
from veil.verify.errors import AttestationError
from veil.verify.roots import load_root_pem


def _refused_code(call: Any) -> tuple[int, str]:
    with pytest.raises(EnclaveCallError) as refused:
        call()
    return refused.value.code, refused.value.message


def _rpc_refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    info = error_info(refused.value)
    return refused.value.code(), info.reason if info else ""


def _token_config(issuer: ed25519.Ed25519PrivateKey, **kwargs: object) -> envelope_pb2.InstanceConfig:
    """A token instance's configuration with `issuer` as its minter (strict unless told)."""
    return config(
        envelope_pb2.APP_KIND_TOKEN,
        envelope_pb2.AUTH_SCHEME_SIGNATURE,
        token_issuer_public_key=issuer.public_key().public_bytes_raw(),
        **kwargs,
    )


def _mint(to: str, amount: int) -> apps_pb2.AppCall:
    return token(mint=apps_pb2.TokenMint(to=to, amount=amount))


def _strict_coins(
    keyvault: RunningKeyvault, pki_dir: Path
) -> tuple[EnclaveBoot, str, ed25519.Ed25519PrivateKey, ecall_pb2.CreateInstanceResponse]:
    """A new boot that created (and registered) a strict token instance; its id and its issuer."""
    instance_id = f"coins-{os.urandom(4).hex()}"
    issuer = ed25519.Ed25519PrivateKey.generate()
    boot = EnclaveBoot(keyvault, pki_dir)
    return boot, instance_id, issuer, boot.create(instance_id, _token_config(issuer))


def _provisioned(keyvault: RunningKeyvault, pki_dir: Path, instance_id: str) -> EnclaveBoot:
    """Another boot on the host, with the instance key released to it."""
    boot = EnclaveBoot(keyvault, pki_dir)
    boot.provision(instance_id)
    return boot


# --- break 1: the enclave quoted host-chosen report data ---------------------------------------


def test_no_ecall_lets_the_host_choose_what_a_quote_covers(keyvault: RunningKeyvault, pki_dir: Path) -> None:
    """The host builds keys of its own (with the real keyvault pin) and wants a genuine quote
    over them, to get a token and instance keys for itself and to have clients seal to it."""
    boot = EnclaveBoot(keyvault, pki_dir)
    own_hpke = os.urandom(32)
    forged = envelope_pb2.EnclavePublicKeys(
        hpke_x25519_public_key=own_hpke,
        hpke_mlkem768x25519_public_key=boot.keys.hpke_mlkem768x25519_public_key,
        signing_public_key=ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw(),
        keyvault_release_public_key=boot.keys.keyvault_release_public_key,
    ).SerializeToString(deterministic=True)
    nonce = os.urandom(32)
    # The old attack: ask for a quote over the forged keys' binding. GetQuote takes a nonce only.
    for chosen in (wire.report_data(forged, nonce), wire.report_data(forged, nonce)[:33], b""):
        code, message = _refused_code(lambda chosen=chosen: boot.host.get_quote(chosen))
        assert (code, message) == (error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT, "nonce must be 32 bytes")
    # Whatever nonce it passes (even one derived from its forged keys), the quote covers the
    # enclave's own keys.
    for chosen_nonce in (nonce, wire.report_data(forged, nonce)[:32]):
        quoted = boot.host.get_quote(chosen_nonce)
        assert quoted.runtime_data == boot.keys.SerializeToString(deterministic=True)
        attest = keyvault_pb2.AttestRequest(quote=quoted.quote, runtime_data=forged, nonce=chosen_nonce)
        status, _ = _rpc_refusal(lambda attest=attest: boot.state.Attest(attest, timeout=TIMEOUT))
        assert status == grpc.StatusCode.PERMISSION_DENIED
    # No request of the ECALL table has any other field that reaches a quote.
    assert [f.name for f in ecall_pb2.GetQuoteRequest.DESCRIPTOR.fields] == ["nonce"]


def test_a_client_refuses_a_bundle_that_names_keys_the_quote_does_not_cover(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    boot = EnclaveBoot(keyvault, pki_dir)
    nonce = os.urandom(32)
    quoted = boot.host.get_quote(nonce)
    token_jwt = boot.state.Attest(
        keyvault_pb2.AttestRequest(quote=quoted.quote, runtime_data=quoted.runtime_data, nonce=nonce),
        timeout=TIMEOUT,
    ).token
    host_keys = envelope_pb2.EnclavePublicKeys()
    host_keys.CopyFrom(boot.keys)
    host_keys.hpke_x25519_public_key = os.urandom(32)
    bundle = gateway_pb2.GetAttestationResponse(
        quote=quoted.quote,
        runtime_data=host_keys.SerializeToString(deterministic=True),
        nonce=nonce,
        attestation_token=token_jwt,
        keys=host_keys,
    )
    bundle.jwks_json = boot.state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=TIMEOUT).jwks_json
    with pytest.raises(AttestationError, match="report data"):
        verify_bundle(bundle, fake_mesh_policy(), root_public_key=load_root_pem(pki_dir / "sgx-root.pem"))


# --- break 2: rewinding an instance within one boot (and across boots) --------------------------


def _ballot_world(keyvault: RunningKeyvault, pki_dir: Path) -> dict[str, Any]:
    """A strict, registered ballot instance with three votes cast and confirmed."""
    boot = EnclaveBoot(keyvault, pki_dir)
    instance_id = f"vote-{os.urandom(4).hex()}"
    people = {
        name: ed25519.Ed25519PrivateKey.generate()
        for name in ("clerk", "alice", "bob", "carol", "dave", "eve")
    }
    accounts = {name: key.public_key().public_bytes_raw().hex() for name, key in people.items()}
    created = boot.create(
        instance_id, config(envelope_pb2.APP_KIND_BALLOT, envelope_pb2.AUTH_SCHEME_SIGNATURE)
    )
    log = [created.entry]
    clients = {name: boot.client(instance_id, signer=key) for name, key in people.items()}

    def honest(*sealed: Any) -> None:
        response = boot.execute(instance_id, *(s.command for s in sealed))
        log.extend(response.entries)
        boot.confirm(boot.advance(response.link))

    create = apps_pb2.BallotCreate(
        ballot_id="chair",
        question="?",
        options=["alice", "bob"],
        eligible_voters=[accounts[n] for n in ("alice", "bob", "carol", "dave")],
    )
    honest(clients["clerk"].seal(ballot(create=create)))
    for name in ("bob", "carol", "dave"):
        vote = apps_pb2.BallotVote(ballot_id="chair", option=1, salt=os.urandom(16))
        honest(clients[name].seal(ballot(vote=vote)))
    return {"boot": boot, "instance": instance_id, "clients": clients, "log": log}


def test_a_host_cannot_rewind_a_ballot_to_read_a_vote(keyvault: RunningKeyvault, pki_dir: Path) -> None:
    """The rewind oracle: capture alice's vote and the clerk's close, run them, read the tally,
    rewind, repeat. Within one boot a loaded instance is never restored again; across boots
    the host only gets a tally by letting the keyvault confirm it, which makes it final."""
    world = _ballot_world(keyvault, pki_dir)
    boot, instance_id, clients, log = world["boot"], world["instance"], world["clients"], world["log"]
    head_k = boot.stored_head(instance_id)
    alice_vote = clients["alice"].seal(
        ballot(vote=apps_pb2.BallotVote(ballot_id="chair", option=0, salt=os.urandom(16)))
    )
    close = clients["clerk"].seal(ballot(close=apps_pb2.BallotClose(ballot_id="chair")))
    # Run them without letting the keyvault hear of it: every answer stays sealed under a key
    # the enclave has not released, and so does a tally read by the host's own identity.
    response = boot.execute(instance_id, alice_vote.command, close.command)
    assert response.held_until == head_k.sequence + 2
    eve_tally = clients["eve"].seal(ballot(tally=apps_pb2.BallotTally(ballot_id="chair")), counter=0)
    query = boot.host.query(instance_id, eve_tally.command, now_ms())
    assert query.read_round
    # A read fence now: the keyvault still holds K, so the round (which read K+2) stays held.
    assert boot.read_fence(instance_id).reads_waiting == 1
    with pytest.raises(KeyError):
        boot.open_read(instance_id, query.read_round, query.outcome)
    for outcome in [*response.outcomes, query.outcome]:
        with pytest.raises(IntegrityError):  # the host cannot open it as a client answer either
            clients["eve"].read(eve_tally, outcome)
        with pytest.raises(KeyError):
            boot.open_held(instance_id, response.held_until, outcome)
    # Rewind within this boot: refused, whatever statement it presents.
    for entries in (log, log[:-1]):
        code, message = _refused_code(
            lambda entries=entries: boot.restore(instance_id, entries, host_time_unix_ms=now_ms())
        )
        assert code == error_pb2.ECALL_ERROR_CODE_ALREADY_EXISTS, message
    # Rewind across boots: possible only while the keyvault head is still K, i.e. while the tally
    # was never released. To read it the host must advance, and then no boot restores K again.
    boot.confirm(boot.advance(response.link))
    boot.read_fence(instance_id)
    boot.open_read(instance_id, query.read_round, query.outcome)
    tally = clients["eve"].read(eve_tally, query.outcome).result.ballot.tally
    assert list(tally.counts) == [1, 3]  # the one final history, as the honest clients see it
    later = _provisioned(keyvault, pki_dir, instance_id)
    code, message = _refused_code(lambda: later.restore(instance_id, log, host_time_unix_ms=now_ms()))
    assert code == error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION
    assert "before the keyvault head" in message
    assert not later.host.get_status().instances


def test_captured_commands_do_not_open_in_another_boot(keyvault: RunningKeyvault, pki_dir: Path) -> None:
    """The host restarts the enclave, restores the head K the keyvault still holds and replays
    captured [alice's vote, close] in another order: commands are sealed to one boot's keys, so
    the new boot cannot even open them (clients seal anew to it, after attesting it)."""
    world = _ballot_world(keyvault, pki_dir)
    boot, instance_id, clients, log = world["boot"], world["instance"], world["clients"], world["log"]
    vote = clients["alice"].seal(
        ballot(vote=apps_pb2.BallotVote(ballot_id="chair", option=0, salt=os.urandom(16)))
    )
    close = clients["clerk"].seal(ballot(close=apps_pb2.BallotClose(ballot_id="chair")))
    assert boot.execute(instance_id, vote.command, close.command).held_until
    second_boot = _provisioned(keyvault, pki_dir, instance_id)
    restored = second_boot.restore(instance_id, log, host_time_unix_ms=now_ms())
    assert restored.head.sequence == len(log)
    again = second_boot.execute(instance_id, close.command, vote.command)
    assert not again.entries
    assert [o.error.message for o in again.outcomes] == ["command could not be opened"] * 2


def test_ballot_close_needs_the_anonymity_set(keyvault: RunningKeyvault, pki_dir: Path) -> None:
    """A host that censors all but one vote cannot have the ballot closed on it."""
    boot = EnclaveBoot(keyvault, pki_dir)
    instance_id = f"vote-{os.urandom(4).hex()}"
    boot.create(instance_id, config(envelope_pb2.APP_KIND_BALLOT, envelope_pb2.AUTH_SCHEME_SIGNATURE))
    clerk = boot.client(instance_id, signer=ed25519.Ed25519PrivateKey.generate())
    alice = boot.client(instance_id, signer=ed25519.Ed25519PrivateKey.generate())
    for sealed in (
        clerk.seal(ballot(create=apps_pb2.BallotCreate(ballot_id="p", question="?", options=["a", "b"]))),
        alice.seal(ballot(vote=apps_pb2.BallotVote(ballot_id="p", option=0, salt=os.urandom(16)))),
    ):
        response = boot.execute(instance_id, sealed.command)
        boot.confirm(boot.advance(response.link))
    close = clerk.seal(ballot(close=apps_pb2.BallotClose(ballot_id="p")))
    response = boot.execute(instance_id, close.command)
    boot.confirm(boot.advance(response.link))
    (outcome,) = response.outcomes
    boot.open_held(instance_id, response.held_until, outcome)
    result = clerk.read(close, outcome)
    assert error_code(result) == "FAILED_PRECONDITION"
    assert "at least 3 votes" in result.error.message


# --- break 3: a fork taking over an instance -------------------------------------------------------


def test_a_second_enclave_with_the_real_key_cannot_take_over_an_instance(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    honest = EnclaveBoot(keyvault, pki_dir)
    instance_id = f"coins-{os.urandom(4).hex()}"
    issuer = ed25519.Ed25519PrivateKey.generate()
    genuine = _token_config(issuer)
    created = honest.create(instance_id, genuine)
    mint = honest.client(instance_id, signer=issuer).seal(_mint("x", 5))
    response = honest.execute(instance_id, mint.command)
    honest.confirm(honest.advance(response.link))
    stored = honest.stored_head(instance_id)
    assert stored.sequence == 2

    # The host starts a second genuine enclave: the keyvault releases it the real key (its build
    # is admitted), and the host wants "its" instance there, with itself as the token issuer.
    host_issuer = ed25519.Ed25519PrivateKey.generate()
    takeover = _token_config(host_issuer)
    rogue = _provisioned(keyvault, pki_dir, instance_id)
    code, message = _refused_code(
        lambda: rogue.host.create_instance(instance_id, takeover, rogue.statement(instance_id), now_ms())
    )
    assert (code, message) == (
        error_pb2.ECALL_ERROR_CODE_ALREADY_EXISTS,
        "the keyvault holds this instance; restore it instead",
    )
    # A statement of "no such instance" the host signs itself, or one made for another
    # challenge, or before it registered and kept for later: all refused.
    forged = head_statement(
        rogue.keys,
        instance_id,
        rogue.host.issue_challenge(instance_id),
        signer=ed25519.Ed25519PrivateKey.generate(),
    )
    code, message = _refused_code(lambda: rogue.host.create_instance(instance_id, takeover, forged, now_ms()))
    assert "not signed by the pinned keyvault" in message
    assert not rogue.host.get_status().instances

    # The race: a statement taken before the honest creation registered is still fresh enough
    # to create a fork locally, but the fork can never move the keyvault head, however far it
    # is padded, so none of its (held) answers is ever released.
    raced_id = f"race-{os.urandom(4).hex()}"
    honest.create_key(raced_id)
    rogue.provision(raced_id)
    early = rogue.statement(raced_id)  # "no such instance", for the rogue's challenge
    honest.create(raced_id, genuine, new_key=False)  # registers the genuine genesis
    fork = rogue.host.create_instance(raced_id, takeover, early, now_ms())
    padding = rogue.client(raced_id, signer=host_issuer)
    links = [fork.link]
    for _ in range(4):
        batch = rogue.execute(raced_id, padding.seal(_mint("h", 1)).command)
        links.append(batch.link)
    code_rpc, reason = _rpc_refusal(lambda: rogue.advance(*links))
    assert (code_rpc, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COMMIT_HEAD_FORK")
    code_rpc, reason = _rpc_refusal(lambda: rogue.advance(*links[1:]))  # skipping the genesis link
    assert code_rpc == grpc.StatusCode.FAILED_PRECONDITION
    assert rogue.stored_head(raced_id).genesis_hash != fork.descriptor.genesis_hash
    # The honest head is untouched and the honest log still restores elsewhere.
    assert honest.stored_head(instance_id).sequence == stored.sequence
    successor = _provisioned(keyvault, pki_dir, instance_id)
    restored = successor.restore(instance_id, [created.entry, *response.entries], host_time_unix_ms=now_ms())
    assert restored.head.sequence == 2
    assert envelope_pb2.InstanceConfig.FromString(restored.descriptor.config) == genuine


# --- break 4: the SDK executing one command several times -----------------------------------------


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path)


@pytest.fixture
def evil(mesh: InProcessMesh) -> Iterator[tuple[EvilGateway, str]]:
    yield from evil_gateway(mesh)


def _through(mesh: InProcessMesh, address: str, **kwargs: Any) -> VeilClient:
    return connect(
        address, policy=fake_mesh_policy(), ca=mesh.pki_dir / "ca.pem", data_dir=mesh.data_dir, **kwargs
    )


def _coins(mesh: InProcessMesh) -> tuple[SigningIdentity, SigningIdentity]:
    alice, bob = new_identity(mesh.data_dir, "alice"), new_identity(mesh.data_dir, "bob")
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        admin.token("coins", alice).mint(alice.account, 100)
    return alice, bob


def _balance(mesh: InProcessMesh, identity: SigningIdentity) -> int:
    with mesh.connect() as client:
        return client.token("coins", identity).balance()


def _pay_bob_once(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str], first_answer: Callable[[grpc.ServicerContext], Any]
) -> tuple[SigningIdentity, int]:
    """Alice pays bob 10 through a gateway that runs every call but answers the first with
    `first_answer(context)` (an abort or a forged reply): the SDK ends with the answer of the one
    transfer, and bob is paid once. Returns alice and how many calls the gateway forwarded."""
    alice, bob = _coins(mesh)
    servicer, address = evil
    calls: list[int] = []

    def replace_first(request: Any, context: grpc.ServicerContext, upstream: Any) -> Any:
        calls.append(1)
        reply = upstream.Execute(request, timeout=10)
        return first_answer(context) if len(calls) == 1 else reply

    servicer.intercept_execute = replace_first
    with _through(mesh, address) as client:
        assert client.token("coins", alice).transfer(bob.account, 10) == 90
    assert _balance(mesh, bob) == 10
    return alice, len(calls)


def test_a_lost_answer_then_a_replay_by_the_host_runs_the_transfer_once(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    """The host executes the transfer, drops the answer (UNAVAILABLE), then, on the SDK's retry,
    submits the same sealed command again under another request id so the state replica's
    deduplication does not catch it. The enclave refuses the replay and names the command
    that used the counter, with the answer it kept: the SDK sees it is its own, returns that
    answer and never re-seals under the next counter."""
    alice, bob = _coins(mesh)
    servicer, address = evil
    seen: list[int] = []

    def lose_then_replay(request: Any, context: grpc.ServicerContext, upstream: Any) -> Any:
        seen.append(1)
        if len(seen) == 1:
            upstream.Execute(request, timeout=10)  # it runs...
            abort(context, Unavailable("connection reset"))  # ...and the answer is "lost"
        replayed = gateway_pb2.ExecuteRequest()
        replayed.CopyFrom(request)
        replayed.request_id = f"host-{len(seen)}-{request.request_id}"[:64]
        return upstream.Execute(replayed, timeout=10)

    servicer.intercept_execute = lose_then_replay
    with _through(mesh, address) as client:
        coins = client.token("coins", alice)
        # The answer comes from the enclave's counter record (with its receipt, re-signed).
        assert coins.transfer(bob.account, 10) == 90
        assert coins.last is not None
        assert coins.last.receipt is not None
        # The kept answer's head counts as seen: later reads must not be older (monotonic reads).
        assert client.head_floor("coins") == coins.last.receipt.sequence
    assert _balance(mesh, bob) == 10  # once, not twice or four times
    assert _balance(mesh, alice) == 90


def test_an_answer_lost_by_an_honest_mesh_is_fetched_again_not_rerun(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    # The retry (same request id) gets the replica's recorded answer.
    _pay_bob_once(mesh, evil, lambda context: abort(context, Unavailable("connection reset")))


def test_a_forged_unopenable_answer_does_not_make_the_sdk_run_the_command_again(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    """The host runs the transfer, then claims the enclave "could not open" it (an answer the
    gateway can forge). The SDK seals it again under the same counter only; the enclave says
    the counter was used by its first sealing, and the recorded answer is fetched."""
    _pay_bob_once(
        mesh,
        evil,
        lambda context: abort(
            context, InvalidArgument("command could not be opened", reason="COMMAND_UNOPENABLE")
        ),
    )


def test_an_ambiguous_attempt_and_a_counter_moved_on_is_outcome_unknown_not_a_resend(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    alice, bob = _coins(mesh)
    servicer, address = evil

    def blackhole(request: Any, context: grpc.ServicerContext, upstream: Any) -> Any:
        abort(context, Unavailable("gateway overloaded"))

    servicer.intercept_execute = blackhole
    pay = token(transfer=apps_pb2.TokenTransfer(to=bob.account, amount=10))
    with _through(mesh, address, timeout=1.5) as client:
        with pytest.raises(GatewayError):  # the answer never came: the outcome is unknown
            client.execute("coins", pay, alice, request_id="pay-bob-once")
        # The same account moves on on another device (its own counters and calls; on this
        # client's data dir its calls would be sealed above this one's high-water mark).
        with mesh.connect(counters=MemoryCounters(), calls=MemoryCalls()) as other_device:
            other_device.token("coins", alice).transfer(bob.account, 1)
            other_device.token("coins", alice).transfer(bob.account, 1)
        servicer.intercept_execute = None
        with pytest.raises(OutcomeUnknown):  # the retry of the same request cannot prove anything
            client.execute("coins", pay, alice, request_id="pay-bob-once")
    assert _balance(mesh, bob) == 2  # the blackholed transfer never ran, and was not re-sent


# --- break 5: an unauthenticated instance configuration ------------------------------------------------


def test_a_host_that_creates_another_configuration_is_caught_at_creation(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    servicer, address = evil
    alice = new_identity(mesh.data_dir, "alice")

    def downgrade(request: Any) -> None:
        request.config.auth_scheme = envelope_pb2.AUTH_SCHEME_NONE  # the host's choice, not the admin's

    servicer.on_create = downgrade
    asked = config(envelope_pb2.APP_KIND_VAULT, envelope_pb2.AUTH_SCHEME_SIGNATURE)
    with _through(mesh, address) as admin, pytest.raises(AttestationError, match="another configuration"):
        admin.create_instance("records", asked)
    # A signing identity never falls back to an anonymous claim of its account there.
    with mesh.connect() as client, pytest.raises(IdentityError, match="authenticates nobody"):
        client.vault("records", alice).put("r", b"secret")
    assert mesh.states[0].calls["Execute"] == 0


def test_the_client_seals_under_the_enclave_signed_configuration_not_the_gateways(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    alice, bob = _coins(mesh)
    servicer, address = evil

    def claim_none(reply: Any) -> None:
        reply.instance.config.auth_scheme = envelope_pb2.AUTH_SCHEME_NONE  # informational only now

    servicer.on_attestation = claim_none
    with _through(mesh, address) as client:
        assert client.token("coins", alice).transfer(bob.account, 1) == 99  # a signature proof

    def relabel(reply: Any) -> None:
        reply.descriptor.config = token_config(bob.public_key).SerializeToString(deterministic=True)

    servicer.on_attestation = relabel
    with pytest.raises(AttestationError, match="not signed by the attested enclave"):
        _through(mesh, address).attest("coins")


def test_a_pinned_instance_created_again_is_refused(mesh: InProcessMesh) -> None:
    _coins(mesh)
    pins = InstancePins(mesh.data_dir / "instances.json")
    pin = pins.get("coins")
    assert pin is not None  # `create_instance` pinned it
    pins._pins["coins"] = type(pin)(
        genesis_hash=b"\x07" * 32, config_hash=pin.config_hash
    )  # another creation
    with mesh.connect(pins=pins) as client, pytest.raises(AttestationError, match="genesis differs"):
        client.attest("coins")


# --- strict acknowledgment: answers are released only by the keyvault's confirmation -------------


def test_a_held_answer_opens_only_with_the_key_the_confirmation_releases(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    boot = EnclaveBoot(keyvault, pki_dir)
    instance_id = f"notes-{os.urandom(4).hex()}"
    boot.create(instance_id, config())
    writer = boot.client(instance_id, account="alice")
    put = writer.seal(
        apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id="r", data=b"x")))
    )
    response = boot.execute(instance_id, put.command)
    (outcome,) = response.outcomes
    with pytest.raises(IntegrityError):
        writer.read(put, outcome)
    # A confirmation the host makes up (not the keyvault's release key) releases nothing.
    key = boot.keys.signing_public_key
    head = response.link.head
    fake = envelope_pb2.HeadConfirmation(instance_id=instance_id, head=head, enclave_signing_public_key=key)
    for signer in (ed25519.Ed25519PrivateKey.generate(), KEYVAULT_RELEASE_KEY):  # the test key is not pinned
        fake.signature = signer.sign(wire.head_confirmation_bytes(instance_id, head.sequence, head.hash, key))
        code, _ = _refused_code(lambda: boot.host.confirm_head(fake))
        assert code == error_pb2.ECALL_ERROR_CODE_PERMISSION_DENIED
    boot.confirm(boot.advance(response.link))
    boot.open_held(instance_id, response.held_until, outcome)
    assert error_code(writer.read(put, outcome)) == "OK"


# --- what the second review found (a fork kept for later, replayed confirmations, stale boots) ----


def _kept_statement_setup(
    keyvault: RunningKeyvault, pki_dir: Path, instance_id: str, genuine: envelope_pb2.InstanceConfig
) -> tuple[EnclaveBoot, EnclaveBoot, envelope_pb2.HeadStatement, ecall_pb2.CreateInstanceResponse]:
    """Boot R takes the keyvault's "no such instance" statement before the honest creation."""
    honest, rogue = EnclaveBoot(keyvault, pki_dir), EnclaveBoot(keyvault, pki_dir)
    honest.create_key(instance_id)
    rogue.provision(instance_id)
    early = rogue.statement(instance_id)
    assert early.head.sequence == 0
    created = honest.create(instance_id, genuine, new_key=False)  # registered at the keyvault
    return honest, rogue, early, created


def test_a_fork_made_with_a_statement_kept_from_before_creation_answers_nothing(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """The host keeps a "no such instance" statement from before the honest creation, then has
    its boot create the id as a FAST instance with itself as token issuer (the host's clock says
    the statement is fresh). Nothing of that fork is ever given out: no descriptor, no answer,
    held or not, because the keyvault never registers it for that boot."""
    instance_id = f"coins-{os.urandom(4).hex()}"
    host_key = ed25519.Ed25519PrivateKey.generate()
    genuine = _token_config(ed25519.Ed25519PrivateKey.generate())  # an issuer the host lacks
    forked = _token_config(host_key, acknowledgment=envelope_pb2.ACKNOWLEDGMENT_FAST)
    honest, rogue, early, created = _kept_statement_setup(keyvault, pki_dir, instance_id, genuine)
    fork = rogue.host.create_instance(instance_id, forked, early, early.not_after_unix_ms)
    assert not fork.HasField("descriptor")  # no descriptor before registration
    minter = rogue.client(instance_id, signer=host_key)
    minted = rogue.execute(instance_id, minter.seal(_mint("victim", 10**6)).command)
    assert minted.held_until  # a fast instance holds everything until it is registered
    query = minter.seal(token(total_supply=apps_pb2.TokenTotalSupply()), counter=0)
    read = rogue.host.query(instance_id, query.command, now_ms())
    assert read.read_round
    # The keyvault never registers it: its links do not extend the registered genesis...
    status, reason = _rpc_refusal(lambda: rogue.advance(fork.link, minted.link))
    assert (status, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COMMIT_HEAD_FORK")
    # ...and a read fence tells the fork the keyvault holds another instance under its id.
    with pytest.raises(EnclaveCallError, match="another instance under this id"):
        rogue.read_fence(instance_id)
    with pytest.raises(KeyError):  # no hold key was ever released for the mint...
        rogue.open_held(instance_id, minted.held_until, minted.outcomes[0])
    with pytest.raises(KeyError):  # ...nor for the read
        rogue.open_read(instance_id, read.read_round, read.outcome)
    assert honest.stored_head(instance_id).genesis_hash == wire.entry_hash(created.entry)


def test_a_kept_statement_cannot_restore_an_old_prefix_of_a_fast_instance(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """With a "no such instance" statement from before creation, the host restores only the
    genesis of a genuine FAST instance whose keyvault head is 4 (a rollback far below the head):
    it is restored, but never registered for that boot, so it answers nothing."""
    instance_id = f"fast-{os.urandom(4).hex()}"
    issuer = ed25519.Ed25519PrivateKey.generate()
    fast = _token_config(issuer, acknowledgment=envelope_pb2.ACKNOWLEDGMENT_FAST)
    honest, rogue, early, created = _kept_statement_setup(keyvault, pki_dir, instance_id, fast)
    minter = honest.client(instance_id, signer=issuer)
    for _ in range(3):
        batch = honest.execute(instance_id, minter.seal(_mint("v", 10)).command)
        assert batch.held_until == 0  # registered: a fast instance answers at once
        honest.confirm(honest.advance(batch.link))
    assert honest.stored_head(instance_id).sequence == 4
    restored = rogue.host.restore(instance_id, [created.entry], statement=early, host_time_unix_ms=0)
    assert restored.head.sequence == 1
    assert not restored.HasField("descriptor")
    reader = rogue.client(instance_id, signer=issuer)
    query = reader.seal(token(total_supply=apps_pb2.TokenTotalSupply()), counter=0)
    assert rogue.host.query(instance_id, query.command, now_ms()).read_round  # held
    status, reason = _rpc_refusal(lambda: rogue.advance(restored.link))
    assert (status, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COMMIT_HEAD_ROLLBACK")
    with pytest.raises(EnclaveCallError, match="not on this enclave's chain"):
        rogue.read_fence(instance_id)


def test_an_old_confirmation_replayed_into_another_boot_releases_nothing(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    instance_id = f"coins-{os.urandom(4).hex()}"
    issuer = ed25519.Ed25519PrivateKey.generate()
    strict = _token_config(issuer)
    honest, rogue, early, created = _kept_statement_setup(keyvault, pki_dir, instance_id, strict)
    log, confirmations = [created.entry], {}
    minter = honest.client(instance_id, signer=issuer)
    for amount in (100, 200, 300):
        batch = honest.execute(instance_id, minter.seal(_mint("a", amount)).command)
        log += batch.entries
        confirmation = honest.advance(batch.link)
        confirmations[confirmation.head.sequence] = confirmation  # the host keeps them
        honest.confirm(confirmation)
    restored = rogue.host.restore(instance_id, log[:2], statement=early, host_time_unix_ms=0)
    assert restored.head.sequence == 2
    code, message = _refused_code(lambda: rogue.host.confirm_head(confirmations[2]))
    assert code == error_pb2.ECALL_ERROR_CODE_PERMISSION_DENIED, message
    assert rogue.host.get_status().instances[0].confirmed.sequence == 0


def _boot_left_behind(keyvault: RunningKeyvault, pki_dir: Path) -> tuple[EnclaveBoot, EnclaveBoot, str, Any]:
    """Boot `first` creates a strict token instance and mints twice; boot `behind` was restored
    honestly at head 1 and left running. Returns both boots, the instance and the issuer."""
    first, instance_id, issuer, created = _strict_coins(keyvault, pki_dir)
    behind = _provisioned(keyvault, pki_dir, instance_id)
    restored = behind.restore(instance_id, [created.entry])
    assert restored.HasField("descriptor")  # the keyvault stated this very head to this boot
    minter = first.client(instance_id, signer=issuer)
    for _ in range(2):
        batch = first.execute(instance_id, minter.seal(_mint("b", 5)).command)
        first.confirm(first.advance(batch.link))
    return first, behind, instance_id, issuer


def test_a_boot_left_behind_gives_no_stale_strict_read(keyvault: RunningKeyvault, pki_dir: Path) -> None:
    """Boot A is restored honestly at head 1 and left running; another boot moves the instance
    on. A's strict query answers wait for a read fence, and the fence tells A it is behind:
    refused, so the host stops serving from it instead of showing a state before acknowledged
    commands."""
    first, behind, instance_id, issuer = _boot_left_behind(keyvault, pki_dir)
    reader = behind.client(instance_id, signer=issuer)
    query = reader.seal(token(total_supply=apps_pb2.TokenTotalSupply()), counter=0)
    answer = behind.host.query(instance_id, query.command, now_ms())
    assert answer.read_round
    with pytest.raises(EnclaveCallError, match="not on this enclave's chain"):
        behind.read_fence(instance_id)
    with pytest.raises(KeyError):
        behind.open_read(instance_id, answer.read_round, answer.outcome)
    # The boot that moved on reads the current head through its own fence.
    minter = first.client(instance_id, signer=issuer)
    fresh = minter.seal(token(total_supply=apps_pb2.TokenTotalSupply()), counter=0)
    current = first.host.query(instance_id, fresh.command, now_ms())
    first.read_fence(instance_id)
    first.open_read(instance_id, current.read_round, current.outcome)
    assert minter.read(fresh, current.outcome).result.token.total_supply.amount == 10


def test_a_boot_left_behind_shows_no_stale_counter_state_in_a_refusal(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """A wrong-counter refusal carries the account's counter state (its last answer and
    receipt). From a boot left behind that state is stale, so a strict instance's refusals wait
    for a read fence like its query answers: the fence tells the old boot it is behind, and the
    refusal never opens. The boot that moved on answers the same refusal once fenced."""
    first, behind, instance_id, issuer = _boot_left_behind(keyvault, pki_dir)
    stale = behind.client(instance_id, signer=issuer)
    wrong = stale.seal(_mint("b", 1), counter=7)
    refused = behind.execute(instance_id, wrong.command)
    assert (refused.held_until, len(refused.entries)) == (0, 0)
    assert refused.read_round  # held, not released with the batch
    (outcome,) = refused.outcomes
    with pytest.raises(IntegrityError):  # the client cannot read it before the fence either
        stale.read(wrong, outcome)
    with pytest.raises(EnclaveCallError, match="not on this enclave's chain"):
        behind.read_fence(instance_id)
    with pytest.raises(KeyError):
        behind.open_read(instance_id, refused.read_round, outcome)

    current = first.client(instance_id, signer=issuer)
    wrong = current.seal(_mint("b", 1), counter=7)
    refused = first.execute(instance_id, wrong.command)
    first.read_fence(instance_id)
    (outcome,) = refused.outcomes
    first.open_read(instance_id, refused.read_round, outcome)
    result = current.read(wrong, outcome)
    assert result.error.code == error_pb2.ECALL_ERROR_CODE_ABORTED
    assert result.counter.next_counter == 3  # the head the keyvault holds, not the stale one


@pytest.mark.parametrize(
    "malform",
    [
        pytest.param(lambda s: setattr(s, "not_after_unix_ms", -1), id="negative-expiry"),
        pytest.param(lambda s: setattr(s, "genesis_hash", b"g" * 70_000), id="oversized-genesis-hash"),
        pytest.param(lambda s: setattr(s.head, "hash", b"h" * 70_000), id="oversized-head-hash"),
    ],
)
def test_a_malformed_read_fence_is_invalid_argument_not_an_internal_error(
    keyvault: RunningKeyvault, pki_dir: Path, malform: Any
) -> None:
    first, _, instance_id, _ = _boot_left_behind(keyvault, pki_dir)
    request = keyvault_pb2.GetCommitHeadRequest(
        instance_id=instance_id,
        enclave_signing_public_key=first.keys.signing_public_key,
        challenge=first.host.issue_challenge(instance_id, reads=True),
    )
    statement = first.state.GetCommitHead(request, timeout=TIMEOUT).statement
    malform(statement)
    code, message = _refused_code(lambda: first.host.confirm_head(statement=statement))
    assert code == error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT, message
    assert "malformed head statement" in message


def test_a_confirmation_kept_from_before_a_refusal_does_not_release_it(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """Fourth review: boot A holds head 2; the host advances the keyvault with A's link but keeps
    the confirmation, lets boot B move the instance on to head 3 (acknowledged), then asks A for
    a wrong-counter refusal and feeds it the kept confirmation. A batch without entries never
    uses a hold key: its refusal waits for a read fence, which A fails."""
    a, instance_id, issuer, created = _strict_coins(keyvault, pki_dir)
    minter = a.client(instance_id, signer=issuer)
    batch2 = a.execute(instance_id, minter.seal(_mint("b", 5)).command)
    kept = a.advance(batch2.link)  # the keyvault holds head 2; A never hears of it
    assert batch2.held_until == 2
    b = _provisioned(keyvault, pki_dir, instance_id)
    b.restore(instance_id, [created.entry, *batch2.entries])
    mover = b.client(instance_id, signer=issuer)
    batch3 = b.execute(instance_id, mover.seal(_mint("b", 7), counter=2).command)
    b.confirm(b.advance(batch3.link))

    stale = a.client(instance_id, signer=issuer)
    wrong = stale.seal(_mint("b", 1), counter=9)
    refused = a.execute(instance_id, wrong.command)
    assert (refused.held_until, bool(refused.read_round)) == (0, True)
    a.confirm(kept)  # releases hold 2 (A's own mint answer), not the refusal's read round
    with pytest.raises(EnclaveCallError, match="not on this enclave's chain"):
        a.read_fence(instance_id)
    with pytest.raises(KeyError):
        a.open_read(instance_id, refused.read_round, refused.outcomes[0])


@pytest.mark.parametrize(
    "malform",
    [
        pytest.param(lambda e: setattr(e, "previous_hash", b"x" * 5), id="short-previous-hash"),
        pytest.param(lambda e: setattr(e, "nonce", b"n" * 70_000), id="oversized-nonce"),
    ],
)
def test_a_malformed_entry_bridging_a_snapshot_to_the_keyvault_head_is_refused_cleanly(
    keyvault: RunningKeyvault, pki_dir: Path, malform: Any
) -> None:
    """A snapshot beyond the keyvault's head must hash-chain to it through stored entries; an
    entry of the wrong shape there is a stale or forged store (FAILED_PRECONDITION), never an
    internal error."""
    a, instance_id, issuer, created = _strict_coins(keyvault, pki_dir)
    minter = a.client(instance_id, signer=issuer)
    batch = a.execute(instance_id, minter.seal(_mint("b", 5)).command)
    snapshot = a.host.snapshot(instance_id)  # at head 2; the keyvault holds 1 (never advanced)
    b = _provisioned(keyvault, pki_dir, instance_id)
    bogus = envelope_pb2.LogEntry()
    bogus.CopyFrom(created.entry)
    malform(bogus)
    code, message = _refused_code(lambda: b.restore(instance_id, [bogus, *batch.entries], snapshot))
    assert code == error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION, message
    assert "does not chain to the keyvault head" in message


def test_an_outcome_seen_on_the_receipt_stream_raises_the_read_floor(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str]
) -> None:
    """Fourth review: the host runs the transfer and drops its answer; the client learns of the
    commit on its WatchReceipts stream. That head counts as seen: later reads must not be older."""
    alice, bob = _coins(mesh)
    servicer, address = evil

    def run_then_drop(request: Any, context: grpc.ServicerContext, upstream: Any) -> Any:
        upstream.Execute(request, timeout=10)
        abort(context, InvalidArgument("bogus", reason="HOST_SAYS_NO"))

    servicer.intercept_execute = run_then_drop
    with _through(mesh, address) as client:
        stream = client.watch_receipts("coins", identity=alice, replay_recent=True)
        received: list[Any] = []
        reader = threading.Thread(target=lambda: received.extend(stream), daemon=True)
        reader.start()
        with pytest.raises(GatewayError):
            client.token("coins", alice).transfer(bob.account, 10)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        stream.cancel()
        reader.join(5)
        (opened,) = received
        assert opened.accepted
        assert opened.receipt is not None
        assert client.head_floor("coins") == opened.receipt.sequence


@pytest.mark.parametrize(
    "code", [error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, error_pb2.ECALL_ERROR_CODE_PERMISSION_DENIED]
)
def test_a_forged_unsealed_refusal_of_a_command_that_ran_is_not_taken_as_final(
    mesh: InProcessMesh, evil: tuple[EvilGateway, str], code: error_pb2.EcallErrorCode.ValueType
) -> None:
    """Fifth review: the host runs the transfer, then answers with an unsealed outcome error
    ("over the memory budget"), which only the host vouches for. Taken as final, the caller
    would send the transfer again as a new call and pay twice. The SDK treats it like a lost
    answer: the same counter again, and the enclave's kept answer says it ran."""

    def forge_refusal(context: grpc.ServicerContext) -> gateway_pb2.ExecuteResponse:
        forged = gateway_pb2.ExecuteResponse()
        forged.outcome.error.code = code
        forged.outcome.error.message = "enclave memory budget exhausted"
        return forged

    alice, calls = _pay_bob_once(mesh, evil, forge_refusal)
    assert calls >= 2
    assert _balance(mesh, alice) == 90
