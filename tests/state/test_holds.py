"""HeldAnswers: hold keys handed to waiters, late waiters, failures, and what it keeps alive."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import Future

import pytest

from veil.enclave import wire
from veil.enclave.v1 import ecall_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state.holds import HeldAnswers


def _hold(held_until: int = 0, read_round: int = 0, key: bytes = b"k" * 32) -> ecall_pb2.ReleasedHold:
    return ecall_pb2.ReleasedHold(held_until=held_until, read_round=read_round, key=key)


def test_a_waiter_gets_its_key_and_a_read_round_is_its_own_slot() -> None:
    holds = HeldAnswers()
    command, query = holds.key("i", 3), holds.read_key("i", 3)
    holds.release("i", [_hold(held_until=3, key=b"c" * 32)])
    assert command.result(0) == b"c" * 32
    assert not query.done()
    holds.release("i", [_hold(read_round=3, key=b"q" * 32)])
    assert query.result(0) == b"q" * 32


def test_a_late_waiter_gets_a_key_released_before_it_asked() -> None:
    holds = HeldAnswers()
    holds.release("i", [_hold(held_until=5, key=b"l" * 32)])
    assert holds.key("i", 5).result(0) == b"l" * 32
    assert not holds.key("j", 5).done()  # another instance's slot


def test_only_the_most_recent_releases_are_kept() -> None:
    holds = HeldAnswers(recent=2)
    holds.release("i", [_hold(held_until=n) for n in (1, 2, 3)])
    assert not holds.key("i", 1).done()
    assert holds.key("i", 2).done()
    assert holds.key("i", 3).done()


def test_a_released_key_does_not_keep_its_waiters_answers_alive() -> None:
    """A done future keeps its callbacks (and all they reach: a batch's answers); keeping 4,096 of
    those made full collections walk millions of objects. Only the key bytes are kept."""

    class Answers:  # stands in for the batch's futures, commands and responses
        pass

    holds = HeldAnswers()
    answers = Answers()
    watch = weakref.ref(answers)
    got: list[bytes] = []

    def open_answers(key: Future[bytes], kept: Answers = answers) -> None:
        got.append(key.result())

    holds.key("i", 7).add_done_callback(open_answers)
    del answers, open_answers
    holds.release("i", [_hold(held_until=7, key=b"r" * 32)])
    gc.collect()
    assert got == [b"r" * 32]
    assert watch() is None
    assert holds.key("i", 7).result(0) == b"r" * 32


def test_failing_an_instance_fails_its_waiters_only_and_failing_all_fails_later_ones() -> None:
    holds = HeldAnswers()
    mine, other = holds.key("i", 1), holds.key("j", 1)
    holds.fail_instance("i", RuntimeError("moved"))
    with pytest.raises(RuntimeError, match="moved"):
        mine.result(0)
    assert not other.done()
    holds.fail(RuntimeError("ended"))
    later: Future[bytes] = holds.key("k", 1)
    for future in (other, later):
        with pytest.raises(RuntimeError, match="ended"):
            future.result(0)


def _vouched(sequence: int, key: bytes) -> keyvault_pb2.HoldKey:
    return keyvault_pb2.HoldKey(sequence=sequence, key=key)


def test_a_keyvault_hold_key_is_handed_out_only_when_it_matches_the_enclaves_check() -> None:
    holds = HeldAnswers()
    good, forged = b"g" * 32, b"f" * 32
    first, second, later = holds.key("i", 3), holds.key("i", 4), holds.key("i", 9)
    holds.expect("i", 3, wire.hold_key_check(good))
    holds.expect("i", 4, wire.hold_key_check(good))
    # A forged key for 4, and a key for a head no batch gave a check for (9): neither opens.
    vouched = holds.release_vouched("i", [_vouched(3, good), _vouched(4, forged), _vouched(9, good)], 4)
    assert first.result(0) == good
    assert not second.done()
    assert not later.done()
    assert vouched == (1, False)  # 3 released; 4 still waits: the enclave must release it
    assert holds.release_vouched("i", [_vouched(4, good)], 4) == (1, True)  # settled up to 4; 9 is later
    assert second.result(0) == good
    assert holds.release_vouched("j", [], 1).settled  # another instance: nothing of it waits


def test_a_waiting_query_does_not_make_a_confirmation_worth_an_ecall() -> None:
    holds = HeldAnswers()
    holds.read_key("i", 1)  # a read fence releases it, never the enclave's confirmation
    assert holds.release_vouched("i", [], 10).settled


def test_a_released_slot_takes_no_check_and_failures_drop_the_checks() -> None:
    holds = HeldAnswers()
    holds.release("i", [_hold(held_until=2, key=b"e" * 32)])
    holds.expect("i", 2, wire.hold_key_check(b"x" * 32))  # already released by the enclave
    assert holds._checks == {}
    holds.expect("i", 3, b"c" * 32)
    holds.fail_instance("i", RuntimeError("moved"))
    assert holds._checks == {}
