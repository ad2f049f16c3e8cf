"""Recovery: restore from the log and from snapshots, and sealing bound to platform and measurement."""

from __future__ import annotations

import secrets

import pytest

from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import KEYVAULT_RELEASE_PUBLIC_KEY, Harness, config, error_code, vault
from veil.enclave import wire
from veil.enclave.errors import DecryptionError
from veil.enclave.providers.sealing import SimSealingProvider
from veil.enclave.v1 import apps_pb2
from veil.services.state.enclave_host import EnclaveCallError


def _put(record_id: str, data: bytes) -> apps_pb2.AppCall:
    return vault(put=apps_pb2.VaultPut(record_id=record_id, data=data))


def _get(record_id: str) -> apps_pb2.AppCall:
    return vault(get=apps_pb2.VaultGet(owner="alice", record_id=record_id))


def test_a_new_enclave_restores_from_the_log_and_from_a_snapshot(make_enclave: MakeEnclave) -> None:
    platform = secrets.token_bytes(32)
    old = Harness.start(make_enclave(platform))
    old.create("v", config())
    alice = old.client("v")
    for i in range(3):
        old.call(alice, _put(f"r{i}", bytes([i])))
    snapshot = old.host.snapshot("v")
    old.call(alice, _put("late", b"after the snapshot"))
    head = old.host.get_status().instances[0].head
    sealed_keys = old.host.seal()

    for use_snapshot in (False, True):
        new = Harness.start(make_enclave(platform))  # a restarted runner: new keys, same platform
        new.keyvault = old.keyvault
        assert new.host.unseal(sealed_keys) == ["v"]
        if use_snapshot:
            restored = new.restore("v", old.log["v"][snapshot.head.sequence :], snapshot)
        else:
            restored = new.restore("v", old.log["v"])
        assert restored == head
        reader = new.client("v", counter=alice.counter)
        assert new.query(reader, _get("late")).result.vault.get.data == b"after the snapshot"
        assert new.query(reader, _get("r2")).result.vault.get.data == b"\x02"
        # Counters survive recovery: a replay of an old command is still refused.
        stale = reader.seal(_put("x", b"x"), counter=alice.counter)
        (outcome,) = new.execute("v", [stale.command], 0).outcomes
        assert error_code(reader.read(stale, outcome)) == "ABORTED"


def test_restore_without_a_genesis_or_snapshot_is_refused(harness: Harness) -> None:
    harness.create("v", config())
    harness.call(harness.client("v"), _put("a", b"1"))
    fresh = harness.restarted()
    with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT"):
        fresh.restore("v", [])
    with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
        fresh.restore("v", harness.log["v"][1:])


def test_sealed_keys_open_only_on_the_same_platform_and_measurement(make_enclave: MakeEnclave) -> None:
    platform_a, platform_b = secrets.token_bytes(32), secrets.token_bytes(32)
    a = Harness.start(make_enclave(platform_a))
    a.provision("v")
    blob = a.host.seal()

    assert Harness.start(make_enclave(platform_a)).host.unseal(blob) == ["v"]
    b = Harness.start(make_enclave(platform_b))
    before = b.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match=r"DATA_LOSS: sealed blob: decryption failed"):
        b.host.unseal(blob)
    assert b.enclave.state_digest() == before

    # Same platform, another enclave build (measurement): refused too.
    other_build = SimSealingProvider(platform_a, secrets.token_bytes(32))
    with pytest.raises(DecryptionError):
        other_build.unseal(blob, wire.sealed_keys_aad(KEYVAULT_RELEASE_PUBLIC_KEY))
    same_build = SimSealingProvider(platform_a, a.enclave.mrenclave)
    assert same_build.unseal(blob, wire.sealed_keys_aad(KEYVAULT_RELEASE_PUBLIC_KEY))


@pytest.mark.parametrize("bit", [0, 8, 8 * 13, -1])
def test_flipped_bit_in_a_sealed_blob_is_refused(harness: Harness, bit: int) -> None:
    harness.provision("v")
    blob = harness.host.seal()
    index = bit // 8 if bit >= 0 else len(blob) - 1
    flipped = blob[:index] + bytes([blob[index] ^ 1]) + blob[index + 1 :]
    before = harness.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
        harness.host.unseal(flipped)
    assert harness.enclave.state_digest() == before


def test_sim_platform_secret_must_be_long_enough(mrenclave: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SimSealingProvider(b"short", mrenclave)
