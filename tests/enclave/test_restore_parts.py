"""A restore sent in parts, against a hostile host.

A long log comes in parts (`more`, then `continues`) so that the host reads the next part while
the enclave replays this one. The parts must restore exactly what one Restore would; until the
last part has passed the checks at the end, the instance is out of reach of every other call; a
refused part ends the restore; a continuation needs the open restore of its own instance; and
everything the first part checks (the statement, the snapshot bridge) stays checked.
"""

from __future__ import annotations

import itertools

import pytest

from tests.enclave.support import NOW_MS, Harness, config, vault
from veil.enclave import wire
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2, error_pb2
from veil.services.state.enclave_host import EnclaveCallError

ENTRIES = 9


def _head(entry: envelope_pb2.LogEntry) -> envelope_pb2.CommitHead:
    return envelope_pb2.CommitHead(sequence=entry.sequence, hash=wire.entry_hash(entry))


def _in_parts(
    new: Harness,
    parts: list[list[envelope_pb2.LogEntry]],
    head: envelope_pb2.CommitHead | None = None,
    snapshot: envelope_pb2.EncryptedSnapshot | None = None,
) -> envelope_pb2.CommitHead:
    first, *rest = parts
    statement = new.statement("v", head)
    restored = new.host.restore(
        "v", first, snapshot, statement=statement, host_time_unix_ms=NOW_MS, more=bool(rest)
    )
    for number, part in enumerate(rest, start=2):
        restored = new.host.continue_restore("v", part, more=number < len(parts))
    return restored.head


def _code(call: object) -> str:
    with pytest.raises(EnclaveCallError) as refused:
        call()  # type: ignore[operator]
    return f"{error_pb2.EcallErrorCode.Name(refused.value.code)}: {refused.value.message}"


@pytest.mark.parametrize("cuts", [(1,), (4,), (1, 2, 8), (0, 5, 5, 9)], ids=str)
def test_parts_restore_exactly_what_one_restore_does(logged: Harness, cuts: tuple[int, ...]) -> None:
    log = logged.log["v"]
    whole = logged.restarted()
    whole.restore("v", log)
    bounds = [0, *cuts, ENTRIES]
    parts = [log[a:b] for a, b in itertools.pairwise(bounds)]  # empty parts included
    new = logged.restarted()
    assert _in_parts(new, parts) == _head(log[-1])
    assert new.enclave.state_digest() == whole.enclave.state_digest()
    assert [i.head for i in new.host.get_status().instances] == [_head(log[-1])]


def test_until_the_last_part_the_instance_is_out_of_reach(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    new.host.restore("v", log[:4], statement=new.statement("v"), host_time_unix_ms=NOW_MS, more=True)
    assert not new.host.get_status().instances
    assert new.host.get_status().memory_used_bytes > 0  # the budget counts it all the same
    sealed = new.client("v").seal(vault(get=apps_pb2.VaultGet(record_id="r0")), counter=0)
    assert _code(lambda: new.host.query("v", sealed.command, NOW_MS)).startswith("ECALL_ERROR_CODE_NOT_FOUND")
    assert _code(lambda: new.host.snapshot("v")).startswith("ECALL_ERROR_CODE_NOT_FOUND")
    assert new.host.continue_restore("v", log[4:]).head == _head(log[-1])
    assert [i.instance_id for i in new.host.get_status().instances] == ["v"]


def test_a_continuation_needs_the_open_restore_of_its_instance(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    before = new.enclave.state_digest()
    assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("v", log))
    new.host.restore("v", log[:3], statement=new.statement("v"), host_time_unix_ms=NOW_MS, more=True)
    assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("w", log[3:]))
    # The refusal above ended the open restore too: "v" cannot be continued either.
    assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("v", log[3:]))
    assert new.enclave.state_digest() == before


def test_a_later_part_carries_entries_only(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    snapshot = logged.host.snapshot("v")
    for extra in ({"statement": new.statement("v")}, {"snapshot": snapshot}):
        new.host.restore("v", log[:3], statement=new.statement("v"), host_time_unix_ms=NOW_MS, more=True)
        request = ecall_pb2.RestoreRequest(
            instance_id="v", entries=[e.SerializeToString() for e in log[3:]], continues=True, **extra
        )
        said = _code(lambda request=request: new.host.call("Restore", request, ecall_pb2.RestoreResponse))
        assert "later parts carry entries only" in said
        assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("v", log[3:]))
    assert not new.host.get_status().instances


def test_a_refused_part_ends_the_restore_and_changes_nothing(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    before = new.enclave.state_digest()
    tampered = envelope_pb2.LogEntry()
    tampered.CopyFrom(log[5])
    tampered.ciphertext = bytes([tampered.ciphertext[0] ^ 1]) + tampered.ciphertext[1:]
    new.host.restore("v", log[:4], statement=new.statement("v"), host_time_unix_ms=NOW_MS, more=True)
    assert "DATA_LOSS: log entry 6" in _code(
        lambda: new.host.continue_restore("v", [log[4], tampered], more=True)
    )
    assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("v", log[6:]))
    assert new.enclave.state_digest() == before
    assert new.host.get_status().memory_used_bytes == 0
    assert new.restore("v", log).sequence == ENTRIES  # a new restore, with a new challenge, works


def test_a_first_part_drops_a_restore_left_open(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    new.host.restore("v", log[:6], statement=new.statement("v"), host_time_unix_ms=NOW_MS, more=True)
    assert _in_parts(new, [log[:2], log[2:]]) == _head(log[-1])
    assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("v", log[6:]))


def test_the_checks_at_the_end_hold_across_parts(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    before = new.enclave.state_digest()
    # The keyvault head (9) is not in the log the parts end with.
    assert "before the keyvault head 9" in _code(lambda: _in_parts(new, [log[:3], log[3:6]]))
    # A fork at the keyvault head, met in a later part.
    forked = envelope_pb2.CommitHead(sequence=7, hash=bytes(32))
    assert "differs from the keyvault head" in _code(lambda: _in_parts(new, [log[:3], log[3:]], forked))
    assert new.enclave.state_digest() == before


def test_the_snapshot_bridge_must_be_whole_in_the_first_part(logged: Harness) -> None:
    log = logged.log["v"]
    snapshot = logged.host.snapshot("v")  # at 9
    behind = _head(log[5])  # the keyvault head at 6: entries 6..9 bridge to the snapshot
    new = logged.restarted()
    said = _code(lambda: _in_parts(new, [log[5:7], log[7:9]], behind, snapshot))
    assert "does not chain to the keyvault head" in said
    assert _in_parts(new, [log[5:9], []], behind, snapshot) == _head(log[-1])


def test_an_instance_being_restored_cannot_be_created_meanwhile(harness: Harness) -> None:
    """The keyvault never registered "n" (K = 0), so a create would pass its statement check."""
    harness.create("n", config())
    genesis = harness.log["n"]
    new = harness.restarted()
    never = envelope_pb2.CommitHead()  # the statement of a keyvault that never saw "n"
    new.host.restore("n", genesis, statement=new.statement("n", never), host_time_unix_ms=NOW_MS, more=True)
    said = _code(lambda: new.host.create_instance("n", config(), new.statement("n", never), NOW_MS))
    assert "FAILED_PRECONDITION: a restore of this instance is open" in said
    assert new.host.continue_restore("n", []).head.sequence == 1


def test_abandon_drops_the_open_restore_and_the_memory_it_held(logged: Harness) -> None:
    log = logged.log["v"]
    new = logged.restarted()
    new.host.restore("v", log[:5], statement=new.statement("v"), host_time_unix_ms=NOW_MS, more=True)
    assert new.host.get_status().memory_used_bytes > 0
    new.host.abandon_restore("w")  # another instance's abandon: not this one's to drop
    assert new.host.get_status().memory_used_bytes > 0
    new.host.abandon_restore("v")
    assert new.host.get_status().memory_used_bytes == 0
    assert "no restore of this instance is open" in _code(lambda: new.host.continue_restore("v", log[5:]))
    new.host.abandon_restore("v")  # nothing open: nothing to do
    assert new.restore("v", log).sequence == ENTRIES
