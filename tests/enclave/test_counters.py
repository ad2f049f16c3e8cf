"""Counter state is typed and names the command that used a counter, with the answer it got.

This is what lets a client tell "my command ran, here is its answer" from "another command used
my counter, mine can never run" without parsing error text (break 4 of issue 11).
"""

from __future__ import annotations

import hashlib

from tests.enclave.support import NOW_MS, Harness, Sealed, config, error_code, vault
from veil.enclave import commands, wire
from veil.enclave.v1 import apps_pb2, command_pb2

PUT = vault(put=apps_pb2.VaultPut(record_id="r", data=b"secret"))


def _response(harness: Harness, sealed: Sealed) -> command_pb2.CommandResponse:
    (outcome,) = harness.run("v", sealed)
    return commands.open_response(sealed.response_key, outcome.sealed_response, "v", sealed.request_id)


def test_a_used_counter_names_its_command_and_keeps_its_answer(harness: Harness) -> None:
    harness.create("v", config())
    alice = harness.client("v")
    first = alice.seal(PUT)
    answered = _response(harness, first)
    assert answered.HasField("receipt")
    first_hash = wire.command_hash(first.command.encapsulated_key, first.command.ciphertext)
    # The very same bytes again (a host replaying them): refused, naming them, with their answer.
    replayed = command_pb2.CommandResult.FromString(_response(harness, first).result)
    assert error_code(replayed) == "ABORTED"
    state = replayed.counter
    assert (state.next_counter, state.last_command_hash, state.last_sequence) == (2, first_hash, 2)
    assert state.last_result == answered.result
    receipt = state.last_receipt
    assert wire.verify_receipt(receipt, harness.keys.signing_public_key)
    assert (receipt.sequence, receipt.command_hash) == (answered.receipt.sequence, first_hash)
    assert receipt.result_hash == hashlib.sha256(answered.result).digest()
    # Another sealing under the same counter: refused, naming the first (not this one).
    other = alice.seal(PUT, counter=1)
    result = command_pb2.CommandResult.FromString(_response(harness, other).result)
    assert error_code(result) == "ABORTED"
    assert result.counter.last_command_hash == first_hash
    assert result.counter.last_command_hash != wire.command_hash(
        other.command.encapsulated_key, other.command.ciphertext
    )


def test_only_refusals_the_sealed_bytes_decide_are_final(harness: Harness) -> None:
    """`may_run_later` is unset where that very sealing can never run (its counter used, its call
    malformed for the app) and set on a counter above the next one, which runs once it is next."""
    harness.create("v", config())
    alice = harness.client("v")
    ahead = alice.seal(PUT, counter=2)
    early = command_pb2.CommandResult.FromString(_response(harness, ahead).result)
    assert (error_code(early), early.may_run_later) == ("ABORTED", True)
    wrong_app = alice.seal(apps_pb2.AppCall(token=apps_pb2.TokenCall()), counter=1)
    malformed = command_pb2.CommandResult.FromString(_response(harness, wrong_app).result)
    assert error_code(malformed) != "OK"
    assert not malformed.may_run_later
    harness.call(alice, PUT)  # counter 1
    used = command_pb2.CommandResult.FromString(_response(harness, alice.seal(PUT, counter=1)).result)
    assert (error_code(used), used.may_run_later) == ("ABORTED", False)
    assert harness.run("v", ahead)[0].accepted  # the early one, now next


def test_a_command_sealing_is_never_answered_sealed_by_the_query_path(harness: Harness) -> None:
    """A host that sends a command (counter above 0) to Query gets an unsealed refusal only:
    nothing its client could take as the enclave's final word; the command still runs once."""
    harness.create("v", config())
    alice = harness.client("v")
    command = alice.seal(PUT)
    response = harness.host.query("v", command.command, NOW_MS)
    assert not response.outcome.sealed_response
    assert "counter 0" in response.outcome.error.message
    assert harness.run("v", command)[0].accepted


def test_queries_carry_the_next_counter_without_the_last_answer(harness: Harness) -> None:
    harness.create("v", config())
    alice = harness.client("v")
    fresh = harness.query(alice, vault(get=apps_pb2.VaultGet(owner="alice", record_id="r")))
    assert (fresh.counter.next_counter, fresh.counter.last_command_hash) == (1, b"")
    harness.call(alice, PUT)
    after = harness.query(alice, vault(get=apps_pb2.VaultGet(owner="alice", record_id="r")))
    assert after.counter.next_counter == 2
    assert after.counter.last_result == b""
    assert not after.counter.HasField("last_receipt")
