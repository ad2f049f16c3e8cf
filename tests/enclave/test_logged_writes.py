"""Log entries record what a command wrote, and restore applies it instead of running it again.

A command's entry carries its writes (its counter record included) while they keep it within
LOGGED_WRITES_OVER_CALL bytes of the call, else its call, which restore runs again (as for an
entry an older enclave wrote). Either way a restored instance holds exactly the state the live
one did.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import Client, Harness, config, error_code, token, vault
from veil.enclave import crypto, runtime, wire
from veil.enclave.v1 import apps_pb2, envelope_pb2, storage_pb2

MINT = 1_000


def _body(harness: Harness, instance_id: str, entry: envelope_pb2.LogEntry) -> storage_pb2.EntryBody:
    key = harness.data_keys[(instance_id, entry.key_version)]
    aad = wire.entry_aad(instance_id, entry.sequence, entry.key_version, entry.previous_hash)
    return storage_pb2.EntryBody.FromString(crypto.aead_open(key, entry.nonce, entry.ciphertext, aad))


def _state(harness: Harness, instance_id: str) -> list[storage_pb2.StoreEntry]:
    """The instance's whole state, read from a snapshot the enclave takes of it."""
    snapshot = harness.host.snapshot(instance_id)
    aad = wire.snapshot_aad(instance_id, snapshot.head.sequence, snapshot.head.hash, snapshot.key_version)
    key = harness.data_keys[(instance_id, snapshot.key_version)]
    return list(
        storage_pb2.InstanceSnapshot.FromString(
            crypto.aead_open(key, snapshot.nonce, snapshot.ciphertext, aad)
        ).entries
    )


def _token_instance(harness: Harness) -> tuple[Client, Client, Client]:
    issuer = ed25519.Ed25519PrivateKey.generate()
    harness.create(
        "t",
        config(
            envelope_pb2.APP_KIND_TOKEN,
            envelope_pb2.AUTH_SCHEME_SIGNATURE,
            token_issuer_public_key=issuer.public_key().public_bytes_raw(),
        ),
    )
    clients = [
        harness.client("t", signer=key)
        for key in (issuer, *(ed25519.Ed25519PrivateKey.generate() for _ in "ab"))
    ]
    return clients[0], clients[1], clients[2]


def _transfer(to: Client, amount: int) -> apps_pb2.AppCall:
    return token(transfer=apps_pb2.TokenTransfer(to=to.identity, amount=amount))


def test_an_entry_records_the_commands_writes_and_not_its_call(harness: Harness) -> None:
    issuer, alice, bob = _token_instance(harness)
    harness.call(issuer, token(mint=apps_pb2.TokenMint(to=alice.identity, amount=MINT)))
    harness.call(alice, _transfer(bob, MINT))  # alice's balance drops to 0: erased, not stored

    executed = _body(harness, "t", harness.log["t"][-1]).command
    assert executed.call == b""
    writes = {tuple(write.key): write for write in executed.writes}
    assert sorted(writes) == sorted(
        [
            ("counter", alice.identity),
            ("token", "balance", alice.identity),
            ("token", "balance", bob.identity),
        ]
    )
    assert writes[("token", "balance", bob.identity)].value == MINT.to_bytes(8, "big")
    erased = writes[("token", "balance", alice.identity)]
    assert erased.erased
    assert erased.value == b""
    counter = storage_pb2.AccountCounter.FromString(writes[("counter", alice.identity)].value)
    assert counter.counter == alice.counter
    assert counter.sequence == harness.log["t"][-1].sequence
    assert [tuple(write.key) for write in executed.writes] == sorted(writes)  # sorted by key


@pytest.mark.parametrize(
    "logged_writes", [runtime.LOGGED_WRITES_OVER_CALL, -(2**20)], ids=["writes", "calls"]
)
def test_restore_gives_exactly_the_live_state(
    make_enclave: MakeEnclave, monkeypatch: pytest.MonkeyPatch, logged_writes: int
) -> None:
    monkeypatch.setattr(runtime, "LOGGED_WRITES_OVER_CALL", logged_writes)
    harness = Harness.start(make_enclave())
    harness.factory = make_enclave
    issuer, alice, bob = _token_instance(harness)
    harness.call(issuer, token(mint=apps_pb2.TokenMint(to=alice.identity, amount=MINT)))
    for amount in (10, 20, MINT):  # the last overdraws: refused by the app, its counter still used
        harness.call(alice, _transfer(bob, amount))
    assert error_code(harness.call(alice, _transfer(bob, MINT))) == "FAILED_PRECONDITION"
    harness.call(bob, _transfer(alice, 30))
    bodies = [_body(harness, "t", entry).command for entry in harness.log["t"][1:]]
    assert all(bool(body.call) == (logged_writes < 0) != bool(body.writes) for body in bodies)

    restored = harness.restarted()
    assert restored.restore("t", harness.log["t"]).sequence == len(harness.log["t"])
    assert _state(restored, "t") == _state(harness, "t")
    # The restored instance goes on from there: alice's next counter, her balance.
    again = restored.client("t", signer=alice.signer, counter=alice.counter)
    assert restored.call(again, _transfer(bob, 5)).result.token.transfer.amount == MINT - 5


def test_writes_far_larger_than_the_call_log_the_call_and_restore_by_running_it(harness: Harness) -> None:
    harness.create("v", config())
    alice = harness.client("v")
    record = bytes(range(256)) * 16  # 4 KiB: a put logs about as many bytes as its call
    harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="big", data=record)))
    # A share names one reader but rewrites the whole 4 KiB record: logged as its call.
    harness.call(alice, vault(share=apps_pb2.VaultShare(record_id="big", reader="bob")))

    put, share = (_body(harness, "v", entry).command for entry in harness.log["v"][1:])
    assert put.writes
    assert not put.call
    assert share.call
    assert not share.writes
    assert all(len(entry.ciphertext) <= 2 * len(record) for entry in harness.log["v"])
    restored = harness.restarted()
    restored.restore("v", harness.log["v"])
    assert _state(restored, "v") == _state(harness, "v")
