"""Batch semantics: commands are isolated from each other, and batching never changes results."""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.enclave.support import NOW_MS, Harness, Sealed, config, error_code, token, vault
from veil.enclave import crypto, wire
from veil.enclave.providers.sealing import SimSealingProvider
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import apps_pb2, command_pb2, envelope_pb2, storage_pb2
from veil.sdk.sealing import seal_plaintext, signing_bytes


class _NoQuotes:
    def quote(self, report_data: bytes) -> bytes:
        raise AssertionError("not used")


def _fresh_harness() -> Harness:
    enclave = Enclave(
        mrenclave=bytes(32),
        quote_provider=_NoQuotes(),
        sealing_provider=SimSealingProvider(secrets.token_bytes(32), bytes(32)),
    )
    return Harness.start(enclave)


def test_one_failing_command_does_not_affect_the_others(harness: Harness) -> None:
    harness.create("v", config())
    alice, bob = harness.client("v", account="alice"), harness.client("v", account="bob")
    ok1 = alice.seal(vault(put=apps_pb2.VaultPut(record_id="a", data=b"1")))
    garbage = alice.seal(vault(put=apps_pb2.VaultPut(record_id="x", data=b"x")))
    garbage.command.ciphertext = garbage.command.ciphertext[:-1] + bytes([garbage.command.ciphertext[-1] ^ 1])
    app_error = bob.seal(vault(delete=apps_pb2.VaultDelete(record_id="missing")))
    replay = ok1
    ok2 = bob.seal(vault(put=apps_pb2.VaultPut(record_id="b", data=b"2")))
    wrong_counter = bob.seal(vault(put=apps_pb2.VaultPut(record_id="c", data=b"3")), counter=99)

    outcomes = harness.run("v", ok1, garbage, app_error, replay, ok2, wrong_counter)
    assert [o.accepted for o in outcomes] == [True, False, True, False, True, False]
    assert [o.sequence for o in outcomes] == [2, 0, 3, 0, 4, 0]
    assert outcomes[1].error.message == "command could not be opened"
    # An app refusal consumes the counter (so it can never be replayed later) and is logged.
    assert error_code(bob.read(app_error, outcomes[2])) == "NOT_FOUND"
    assert error_code(alice.read(replay, outcomes[3])) == "ABORTED"
    assert error_code(bob.read(ok2, outcomes[4])) == "OK"
    assert error_code(bob.read(wrong_counter, outcomes[5])) == "ABORTED"
    assert (
        harness.query(alice, vault(get=apps_pb2.VaultGet(owner="alice", record_id="a"))).result.vault.get.data
        == b"1"
    )
    assert (
        harness.query(bob, vault(get=apps_pb2.VaultGet(owner="bob", record_id="b"))).result.vault.get.data
        == b"2"
    )
    assert harness.host.get_status().instances[0].head.sequence == 4


def test_batch_returns_one_entry_per_accepted_command_chained_and_signed(harness: Harness) -> None:
    harness.create("v", config())
    client = harness.client("v")
    sealed = [client.seal(vault(put=apps_pb2.VaultPut(record_id=str(i), data=b"x"))) for i in range(5)]
    response = harness.host.execute_batch("v", [s.command for s in sealed], NOW_MS)
    previous = wire.entry_hash(harness.log["v"][0])
    for expected_sequence, entry in enumerate(response.entries, start=2):
        assert entry.sequence == expected_sequence
        assert entry.previous_hash == previous
        previous = wire.entry_hash(entry)
    # The link moves the keyvault head from the genesis to the batch's last entry.
    link = response.link
    assert (link.base.sequence, link.base.hash) == (1, wire.entry_hash(harness.log["v"][0]))
    assert (link.head.sequence, link.head.hash) == (6, previous)
    assert link.genesis_hash == wire.entry_hash(harness.log["v"][0])
    assert wire.verify_commit_link(link, harness.keys.signing_public_key)
    empty = harness.host.execute_batch("v", [], NOW_MS)
    assert not empty.entries
    assert not empty.HasField("link")


# --- property: one batch == one command per batch ------------------------------------------------

ACTORS = 3  # actor 0 is the token issuer
op = st.tuples(
    st.integers(0, ACTORS - 1),  # who
    st.sampled_from(["mint", "transfer", "balance", "supply", "garbage", "stale", "skip"]),
    st.integers(0, 60),  # amount
    st.integers(0, ACTORS - 1),  # to whom
)


def _plain_commands(
    ops: list[tuple[int, str, int, int]], keys: list[ed25519.Ed25519PrivateKey]
) -> list[tuple[command_pb2.Command | None, int]]:
    """(command without instance, signer index); None = an unopenable blob."""
    accounts = [k.public_key().public_bytes_raw().hex() for k in keys]
    counters = [0] * ACTORS
    plain: list[tuple[command_pb2.Command | None, int]] = []
    for who, kind, amount, to in ops:
        if kind == "garbage":
            plain.append((None, who))
            continue
        call = {
            "mint": token(mint=apps_pb2.TokenMint(to=accounts[to], amount=amount)),
            "transfer": token(transfer=apps_pb2.TokenTransfer(to=accounts[to], amount=amount)),
            "balance": token(balance=apps_pb2.TokenBalance()),
            "supply": token(total_supply=apps_pb2.TokenTotalSupply()),
            "stale": token(balance=apps_pb2.TokenBalance()),
            "skip": token(balance=apps_pb2.TokenBalance()),
        }[kind]
        counter = {"stale": counters[who], "skip": counters[who] + 2}.get(kind, counters[who] + 1)
        if kind not in ("stale", "skip"):
            counters[who] += 1
        command = command_pb2.Command(
            counter=counter,
            request_id=f"r{len(plain)}",
            response_key=secrets.token_bytes(32),
            call=call.SerializeToString(),
        )
        plain.append((command, who))
    return plain


def _seal_for(
    harness: Harness,
    instance_id: str,
    plain: list[tuple[command_pb2.Command | None, int]],
    keys: list[ed25519.Ed25519PrivateKey],
) -> list[Sealed]:
    sealed = []
    for template, who in plain:
        if template is None:
            blob = envelope_pb2.SealedCommand(
                suite=crypto.X25519_SUITE, encapsulated_key=bytes(32), ciphertext=b"junk"
            )
            sealed.append(Sealed(instance_id, "-", 0, "", bytes(32), blob))
            continue
        command = command_pb2.Command.FromString(template.SerializeToString())
        command.instance_id = instance_id
        command.auth.signature.public_key = keys[who].public_key().public_bytes_raw()
        command.auth.signature.signature = keys[who].sign(signing_bytes(command))
        blob = seal_plaintext(harness.keys, command.SerializeToString(), instance_id=instance_id)
        sealed.append(
            Sealed(instance_id, command.request_id, command.counter, "", command.response_key, blob)
        )
    return sealed


def _observe(
    harness: Harness, instance_id: str, sealed: Sealed, outcome: envelope_pb2.CommandOutcome
) -> tuple[bool, int, bytes]:
    if not outcome.sealed_response:
        return (outcome.accepted, outcome.sequence, outcome.error.SerializeToString())
    client = harness.client(instance_id)
    result = client.read(sealed, outcome)
    # These name this instance's own sealing of the call (and the receipt signs that name).
    result.counter.ClearField("last_command_hash")
    result.counter.ClearField("last_receipt")
    return (outcome.accepted, outcome.sequence, result.SerializeToString(deterministic=True))


def _state(harness: Harness, instance_id: str, key: bytes) -> list[storage_pb2.StoreEntry]:
    snapshot = harness.host.snapshot(instance_id)
    aad = wire.snapshot_aad(instance_id, snapshot.head.sequence, snapshot.head.hash, snapshot.key_version)
    entries = list(
        storage_pb2.InstanceSnapshot.FromString(
            crypto.aead_open(key, snapshot.nonce, snapshot.ciphertext, aad)
        ).entries
    )
    for entry in entries:  # counters name the sealed command that used them: differ by design
        if entry.key[0] == "counter":
            counter = storage_pb2.AccountCounter.FromString(entry.value)
            counter.ClearField("command_hash")
            entry.value = counter.SerializeToString(deterministic=True)
    return entries


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=12))
def test_results_are_identical_in_one_batch_or_one_by_one(ops: list[tuple[int, str, int, int]]) -> None:
    harness = _fresh_harness()
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(ACTORS)]
    issuer = keys[0].public_key().public_bytes_raw()
    token_config = config(
        envelope_pb2.APP_KIND_TOKEN, envelope_pb2.AUTH_SCHEME_SIGNATURE, token_issuer_public_key=issuer
    )
    data_key = secrets.token_bytes(32)
    for instance_id in ("batched", "single"):
        harness.provision(instance_id, key=data_key)
        harness.create(instance_id, token_config)
    plain = _plain_commands(ops, keys)

    batched = _seal_for(harness, "batched", plain, keys)
    batched_outcomes = harness.run("batched", *batched)
    single = _seal_for(harness, "single", plain, keys)
    single_outcomes = [harness.run("single", s)[0] for s in single]

    assert [_observe(harness, "batched", s, o) for s, o in zip(batched, batched_outcomes, strict=True)] == [
        _observe(harness, "single", s, o) for s, o in zip(single, single_outcomes, strict=True)
    ]
    assert _state(harness, "batched", data_key) == _state(harness, "single", data_key)
