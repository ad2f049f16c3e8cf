"""A hostile host's bytes in Restore: the enclave restores exactly the state it wrote, or refuses.

Restore takes the log entries as stored bytes. Whatever the host puts there (non-canonical
encodings, duplicated or unknown fields, entries relabelled, moved, re-keyed or taken from
another instance, fields at their limits, random mutations, forged bridges to a snapshot), the
enclave either restores the same head, state and memory accounting as the honest log, or
refuses with a clean EnclaveCallError (never INTERNAL) and changes nothing.
"""

from __future__ import annotations

import random
import re

import pytest

from tests.attack.mutations import mutate, mutate_message, random_message
from tests.enclave.support import Harness, config, vault
from veil.enclave import wire
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.services.state.enclave_host import EnclaveCallError


class World:
    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        harness.create("v", config())
        harness.create("w", config())
        alice, other = harness.client("v"), harness.client("w")
        for i in range(3):
            harness.call(alice, vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x" * (10 + i))))
            harness.call(other, vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"y" * (10 + i))))
        harness.provision("v", 2)  # rotation: the next entries of v are under version 2
        harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="r0", data=b"")))  # update to shorter
        harness.call(alice, vault(delete=apps_pb2.VaultDelete(record_id="r1")))
        harness.call(alice, vault(put=apps_pb2.VaultPut(record_id="r9", data=b"z" * 50)))
        harness.call(alice, vault(delete=apps_pb2.VaultDelete(record_id="r9")))
        self.v = [e.SerializeToString() for e in harness.log["v"]]
        self.w = [e.SerializeToString() for e in harness.log["w"]]
        assert {envelope_pb2.LogEntry.FromString(b).key_version for b in self.v} == {1, 2}
        self.live_memory = harness.host.get_status().memory_used_bytes
        honest = harness.restarted()
        self.head = honest.restore("v", self.v)
        self.digest = honest.enclave.state_digest()
        self.fresh = harness.restarted()

    def next_fresh(self) -> Harness:
        self.fresh = self.harness.restarted()
        return self.fresh

    def attempt(self, entries: list[bytes]) -> str:
        """Restore `entries` in a fresh boot: "same" (exactly the honest state) or the refusal."""
        fresh = self.fresh
        before = fresh.enclave.state_digest()
        try:
            head = fresh.restore("v", entries)
        except EnclaveCallError as exc:
            assert exc.code != error_pb2.ECALL_ERROR_CODE_INTERNAL, exc  # noqa: PT017
            assert fresh.enclave.state_digest() == before, "a refused Restore left state behind"
            return exc.code_name
        assert head == self.head, "restored a head the enclave did not write"
        assert fresh.enclave.state_digest() == self.digest, "restored a state the enclave did not write"
        self.next_fresh()
        return "same"


@pytest.fixture
def world(harness: Harness) -> World:
    return World(harness)


def test_restore_gives_the_live_memory_accounting(world: World) -> None:
    # v and w loaded live; a restored v alone must account exactly v's share.
    fresh = world.fresh
    fresh.restore("w", world.w)
    fresh.restore("v", world.v)
    assert fresh.host.get_status().memory_used_bytes == world.live_memory


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _reencode(entry: envelope_pb2.LogEntry, *, reverse: bool, extra: bytes) -> bytes:
    parts = [
        _field(1, 2, entry.instance_id.encode()),
        _field(2, 0, _varint(entry.sequence)),
        _field(3, 0, _varint(entry.key_version)),
        _field(4, 2, entry.previous_hash),
        _field(5, 2, entry.nonce),
        _field(6, 2, entry.ciphertext),
    ]
    if reverse:
        parts.reverse()
    return extra + b"".join(parts) + extra


UNKNOWN = _field(99, 0, _varint(2**63)) + _field(100, 2, b"junk") + _field(101, 5, b"\x00" * 4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("extra", [b"", UNKNOWN], ids=["plain", "unknown-fields"])
def test_non_canonical_encodings_restore_the_same_state(world: World, reverse: bool, extra: bytes) -> None:
    blobs = [_reencode(envelope_pb2.LogEntry.FromString(b), reverse=reverse, extra=extra) for b in world.v]
    assert world.attempt(blobs) == "same"


def test_duplicated_fields_last_one_wins(world: World) -> None:
    entries = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
    # junk first, the real value last: the real entry (same state)
    blobs = [_field(6, 2, b"junk") + _field(3, 0, _varint(7)) + b for b in world.v]
    assert world.attempt(blobs) == "same"
    # the real value first, junk last: another entry, refused
    for position in range(len(entries)):
        for junk in (_field(6, 2, b"junk"), _field(3, 0, _varint(7)), _field(2, 0, _varint(2**64 - 1))):
            blobs = list(world.v)
            blobs[position] += junk
            assert world.attempt(blobs) != "same"


def _rechain(instance_id: str, entries: list[envelope_pb2.LogEntry]) -> list[bytes]:
    """What a hostile host does after editing cleartext fields: re-link every previous_hash."""
    previous = wire.ZERO_HASH
    out = []
    for entry in entries:
        entry.previous_hash = previous
        previous = wire.entry_hash(entry)
        out.append(entry.SerializeToString())
    return out


def test_key_version_relabelled_is_refused(world: World) -> None:
    entries = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
    for position, entry in enumerate(entries):
        for version in {1, 2, 0, 7, 2**32 - 1} - {entry.key_version}:
            changed = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
            changed[position].key_version = version
            code = world.attempt(_rechain("v", changed))
            assert code in {"ECALL_ERROR_CODE_DATA_LOSS", "ECALL_ERROR_CODE_FAILED_PRECONDITION"}, code


def test_entries_of_another_instance_or_position_are_refused(world: World) -> None:
    v = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
    w = [envelope_pb2.LogEntry.FromString(b) for b in world.w]
    # w's entry relabelled to v at the same position (chain re-linked)
    for position in range(1, len(w)):
        changed = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
        donor = envelope_pb2.LogEntry.FromString(w[position].SerializeToString())
        donor.instance_id = "v"
        changed[position] = donor
        assert world.attempt(_rechain("v", changed)) == "ECALL_ERROR_CODE_DATA_LOSS"
    # an entry moved to another position, renumbered, chain re-linked
    for source in range(1, len(v)):
        for target in range(1, len(v)):
            if source == target:
                continue
            changed = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
            moved = envelope_pb2.LogEntry.FromString(v[source].SerializeToString())
            moved.sequence = target + 1
            changed[target] = moved
            assert world.attempt(_rechain("v", changed)) == "ECALL_ERROR_CODE_DATA_LOSS"
    # the same entry twice, dropped, or the log cut short before the keyvault head
    assert world.attempt([*world.v, world.v[-1]]) != "same"
    assert world.attempt(world.v[:3] + world.v[4:]) != "same"
    assert world.attempt(world.v[:-1]) == "ECALL_ERROR_CODE_FAILED_PRECONDITION"


@pytest.mark.parametrize("position", [0, 1, 4, -1])
def test_forged_fields_at_the_edges_are_refused_cleanly(world: World, position: int) -> None:
    base = envelope_pb2.LogEntry.FromString(world.v[position])
    forgeries: dict[str, dict[str, object]] = {
        "sequence max": {"sequence": 2**64 - 1},
        "sequence 0": {"sequence": 0},
        "key_version max": {"key_version": 2**32 - 1},
        "previous empty": {"previous_hash": b""},
        "previous odd": {"previous_hash": b"\x00" * 31},
        "previous long": {"previous_hash": base.previous_hash + b"\x00"},
        "nonce empty": {"nonce": b""},
        "nonce 11": {"nonce": base.nonce[:11]},
        "nonce 13": {"nonce": base.nonce + b"\x00"},
        "nonce huge": {"nonce": b"\x00" * 70_000},
        "ciphertext empty": {"ciphertext": b""},
        "ciphertext short": {"ciphertext": base.ciphertext[:15]},
        "instance empty": {"instance_id": ""},
        "instance other": {"instance_id": "w"},
    }
    for name, change in forgeries.items():
        forged = envelope_pb2.LogEntry.FromString(world.v[position])
        for field, value in change.items():
            setattr(forged, field, value)
        blobs = list(world.v)
        blobs[position] = forged.SerializeToString()
        assert world.attempt(blobs) != "same", name


def _mutate(rng: random.Random, blob: bytes, donors: list[bytes]) -> bytes:
    kind = rng.randrange(7)
    if kind == 0 and blob:
        i = rng.randrange(len(blob))
        return blob[:i] + bytes([blob[i] ^ (1 << rng.randrange(8))]) + blob[i + 1 :]
    if kind == 1:
        return blob[: rng.randrange(len(blob) + 1)]
    if kind == 2:
        i = rng.randrange(len(blob) + 1)
        return blob[:i] + rng.randbytes(rng.randrange(1, 8)) + blob[i:]
    if kind == 3:
        return blob + rng.choice(donors)
    if kind == 4:
        donor = rng.choice(donors)
        return blob[: rng.randrange(len(blob) + 1)] + donor[rng.randrange(len(donor) + 1) :]
    if kind == 5:
        i = rng.randrange(len(blob))
        return blob[:i] + bytes([rng.choice([0, 0x7F, 0x80, 0xFF])]) + blob[i + 1 :]
    return rng.choice(donors)


def test_random_mutations_never_restore_another_state(world: World) -> None:
    rng = random.Random(54430)
    donors = world.v + world.w
    outcomes: dict[str, int] = {}
    for _ in range(400):
        blobs = list(world.v)
        for _ in range(rng.choice([1, 1, 1, 2])):
            position = rng.randrange(len(blobs))
            blobs[position] = _mutate(rng, blobs[position], donors)
        result = world.attempt(blobs)
        outcomes[result] = outcomes.get(result, 0) + 1
    assert set(outcomes) <= {
        "same",
        "ECALL_ERROR_CODE_DATA_LOSS",
        "ECALL_ERROR_CODE_FAILED_PRECONDITION",
        "ECALL_ERROR_CODE_INVALID_ARGUMENT",
    }, outcomes


def test_snapshot_bridge_with_forged_entries_is_refused_cleanly(world: World) -> None:
    harness = world.harness
    snapshot = harness.host.snapshot("v")
    entries = [envelope_pb2.LogEntry.FromString(b) for b in world.v]
    k = 3  # the keyvault head behind the snapshot: the bridge is entries 3..S
    kv_head = envelope_pb2.CommitHead(sequence=k, hash=wire.entry_hash(entries[k - 1]))
    bridge = world.v[k - 1 :]
    fresh = world.fresh
    assert fresh.restore("v", bridge, snapshot, keyvault_head=kv_head) == world.head
    for position in range(len(bridge)):
        for change in (
            {"nonce": b"\x00" * 70_000},
            {"previous_hash": b"\x00" * 5},
            {"sequence": 2**64 - 1},
            {"key_version": 2**32 - 1},
            {"instance_id": "w"},
        ):
            forged = envelope_pb2.LogEntry.FromString(bridge[position])
            for field, value in change.items():
                setattr(forged, field, value)
            blobs = list(bridge)
            blobs[position] = forged.SerializeToString()
            fresh = world.next_fresh()
            before = fresh.enclave.state_digest()
            with pytest.raises(EnclaveCallError) as refused:
                fresh.restore("v", blobs, snapshot, keyvault_head=kv_head)
            assert refused.value.code != error_pb2.ECALL_ERROR_CODE_INTERNAL
            assert fresh.enclave.state_digest() == before


_EDGES: dict[str, list[object]] = {
    "sequence": [0, 1, 2**63, 2**64 - 1],
    "key_version": [0, 2, 3, 2**31, 2**32 - 1],
    "previous_hash": [b"", b"\x00" * 31, b"\x00" * 33, wire.ZERO_HASH],
    "nonce": [b"", b"\x00" * 11, b"\x00" * 13, b"\x00" * 70_000],
    "ciphertext": [b"", b"\x00" * 16],
    "instance_id": ["", "w", "v\x00", "\u00e9"],
}


def _hostile(rng: random.Random, world: World) -> list[bytes]:
    blobs = list(world.v)
    for _ in range(rng.choice([1, 1, 2])):
        position = rng.randrange(len(blobs))
        entry = envelope_pb2.LogEntry.FromString(world.v[position])
        kind = rng.randrange(5)
        if kind == 0:
            blob = random_message(rng, envelope_pb2.LogEntry.DESCRIPTOR).SerializeToString()
        elif kind == 1:
            blob = mutate_message(rng, entry).SerializeToString()
        elif kind == 2:
            blob = mutate(rng, blobs[position], world.v + world.w)
        elif kind == 3:
            field = rng.choice(sorted(_EDGES))
            setattr(entry, field, rng.choice(_EDGES[field]))
            blob = entry.SerializeToString()
        else:  # a donor entry from w, renamed and placed, the chain re-linked after it
            donor = envelope_pb2.LogEntry.FromString(rng.choice(world.w))
            donor.instance_id, donor.sequence = "v", position + 1
            donor.previous_hash = entry.previous_hash
            blob = donor.SerializeToString()
        blobs[position] = blob
        if rng.random() < 0.5 and kind != 2:  # a hostile host re-links the rest of the chain
            try:
                previous = wire.entry_hash(envelope_pb2.LogEntry.FromString(blob))
            except Exception:
                continue
            for later in range(position + 1, len(blobs)):
                try:
                    nxt = envelope_pb2.LogEntry.FromString(blobs[later])
                    nxt.previous_hash = previous
                    previous = wire.entry_hash(nxt)
                except Exception:  # an earlier mutation made it unhashable: leave the rest
                    break
                blobs[later] = nxt.SerializeToString()
    return blobs


def test_hostile_entries_reach_every_refusal_and_never_another_state(world: World) -> None:
    seen: dict[str, int] = {}
    for seed in range(1500):
        rng = random.Random(seed)
        fresh = world.fresh
        before = fresh.enclave.state_digest()
        blobs = _hostile(rng, world)
        try:
            head = fresh.restore("v", blobs)
        except EnclaveCallError as exc:
            assert exc.code in {  # noqa: PT017
                error_pb2.ECALL_ERROR_CODE_DATA_LOSS,
                error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION,
                error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT,
            }, (seed, exc)
            assert fresh.enclave.state_digest() == before, seed
            reason = re.sub(r"\d+", "N", exc.message)
            seen[reason] = seen.get(reason, 0) + 1
            continue
        assert head == world.head, seed
        assert fresh.enclave.state_digest() == world.digest, seed
        seen["same"] = seen.get("same", 0) + 1
        world.next_fresh()
    # every check on the way was reached
    assert {
        "entry N of the restore request is unreadable",
        "log entry N does not continue the chain at N",
        "log entry N: decryption failed",
        "key version N of 'v' not provisioned",
        "same",
    } <= set(seen), seen
