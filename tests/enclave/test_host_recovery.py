"""The state host's recovery steps against a real in-process enclave, with a tampered database.

Restore gets the entries as stored; when a check refuses, the host checks the chain entry by
entry and names the first bad entry (quoting the enclave's reason when it has one). The
stored `entry_hash` column is the host's own index: wrong on an older entry of an intact log,
nothing is refused (the enclave checked the entries themselves); wrong where it is used, it is
named as an altered entry.
"""

from __future__ import annotations

import secrets

import pytest

from tests.enclave.support import NOW_MS, Harness, config, vault
from tests.state.support import MemoryLog
from veil.enclave import wire
from veil.enclave.v1 import apps_pb2, envelope_pb2
from veil.services.state import recovery
from veil.services.state.errors import RecoveryRefused
from veil.services.state.keyvault_client import RemoteHead
from veil.services.state.store import StoredEntry


@pytest.fixture(autouse=True, params=[recovery.PART_ENTRIES, 2], ids=["one-part", "parts-of-2"])
def parts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case here runs with the log sent in one Restore part and in parts of two entries."""
    monkeypatch.setattr(recovery, "PART_ENTRIES", request.param)


@pytest.fixture
def logged(harness: Harness) -> tuple[Harness, list[StoredEntry]]:
    harness.create("v", config())
    alice = harness.client("v")
    for i in range(5):
        harness.call(alice, vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x" * 20)))
    return harness, [StoredEntry.of(e) for e in harness.log["v"]]


def _recover(harness: Harness, rows: list[StoredEntry], kv: int) -> str:
    """Start-up recovery of "v" as startup.py does it, in a fresh boot; "served" or the refusal."""
    fresh = harness.restarted()
    head = envelope_pb2.CommitHead(sequence=kv, hash=rows[kv - 1].entry_hash if kv else b"")
    # the keyvault's true hash at kv (the stored column may be the corrupted thing)
    if kv:
        head.hash = wire.entry_hash(envelope_pb2.LogEntry.FromString(rows[kv - 1].blob))
    remote = RemoteHead(kv, head.hash, statement=fresh.statement("v", head))
    try:
        log = recovery.read_log("v", MemoryLog(rows).store())
        recovery.check_freshness(log, remote)
        recovery.restore(fresh.host, log, remote, now_ms=NOW_MS)
    except RecoveryRefused as exc:
        return f"refused: {exc.message}"
    return "served"


def _corrupt_column(rows: list[StoredEntry], sequence: int) -> list[StoredEntry]:
    rows = list(rows)
    rows[sequence - 1] = rows[sequence - 1]._replace(entry_hash=secrets.token_bytes(32))
    return rows


def test_a_wrong_hash_column_on_an_older_entry_of_an_intact_log_is_not_refused(
    logged: tuple[Harness, list[StoredEntry]],
) -> None:
    harness, rows = logged
    assert _recover(harness, _corrupt_column(rows, 3), len(rows)) == "served"


@pytest.mark.parametrize("behind", [0, 2], ids=["database-at-the-keyvault-head", "database-ahead"])
def test_a_wrong_hash_column_at_the_head_is_named_as_an_altered_entry(
    logged: tuple[Harness, list[StoredEntry]], behind: int
) -> None:
    harness, rows = logged
    head = len(rows)
    said = _recover(harness, _corrupt_column(rows, head), head - behind)
    assert f"at sequence {head}: log entry was altered" in said


def test_a_nonce_too_long_to_encode_is_named_not_a_crash(logged: tuple[Harness, list[StoredEntry]]) -> None:
    harness, rows = logged
    entry = envelope_pb2.LogEntry.FromString(rows[2].blob)
    entry.nonce = b"\x00" * 70_000  # its length does not fit the entry hash's 2-byte prefix
    bad = list(rows)
    bad[2] = rows[2]._replace(blob=entry.SerializeToString())
    said = _recover(harness, bad, 2)
    assert "at sequence 3: log entry is malformed" in said
    assert "the enclave: ECALL_ERROR_CODE_DATA_LOSS" in said


def test_the_refusal_names_the_first_bad_entry_and_quotes_the_enclave(
    logged: tuple[Harness, list[StoredEntry]],
) -> None:
    # Entry 3 altered and its stored hash recomputed: entry 4 no longer chains to it.
    harness, rows = logged
    entry = envelope_pb2.LogEntry.FromString(rows[2].blob)
    entry.ciphertext = bytes([entry.ciphertext[0] ^ 1]) + entry.ciphertext[1:]
    bad = list(rows)
    bad[2] = StoredEntry.of(entry)
    said = _recover(harness, bad, 2)
    assert "at sequence 4: log entry does not chain to entry 3" in said
    assert "the enclave: ECALL_ERROR_CODE_DATA_LOSS: log entry 3: decryption failed" in said


def test_missing_keys_are_every_version_of_a_sound_chain_and_none_of_a_broken_one(harness: Harness) -> None:
    harness.create("v", config())
    alice = harness.client("v")
    harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="a", data=b"1")))
    harness.provision("v", 2)
    harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="b", data=b"2")))
    rows = [StoredEntry.of(e) for e in harness.log["v"]]
    kv = envelope_pb2.CommitHead(sequence=len(rows), hash=rows[-1].entry_hash)

    def attempt(stored: list[StoredEntry]) -> object:
        boot = harness.restarted()
        boot.enclave._data_keys["v"].pop(2)  # the sealed cache lacked version 2 (after a rotation)
        log = recovery.read_log("v", MemoryLog(stored).store())
        remote = RemoteHead(kv.sequence, kv.hash, statement=boot.statement("v", kv))
        try:
            recovery.restore(boot.host, log, remote, now_ms=NOW_MS)
        except recovery.MissingKey as missing:
            return missing.versions
        except RecoveryRefused as refused:
            return refused.message
        return "served"

    assert attempt(rows) == {1, 2}
    entry = envelope_pb2.LogEntry.FromString(rows[1].blob)
    entry.key_version = 2**32 - 1  # the host relabels a key version: named, no key asked for
    bad = [rows[0], rows[1]._replace(blob=entry.SerializeToString()), *rows[2:]]
    assert "at sequence 2: log entry was altered" in str(attempt(bad))
