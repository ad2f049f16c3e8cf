"""The sealed-command decoder against mutated SealedCommands and hostile, correctly sealed plaintexts.

Each example runs one ExecuteBatch of three commands for one instance: two good commands from
fresh accounts and one bad command, at a random place. Bad commands are mutated SealedCommands
(suite, encapsulated key, ciphertext, a donor's key) or plaintexts sealed correctly to the
enclave: random Command messages, one field changed (wrong instance, counter, request id,
response key), byte-mutated encodings, hostile AppCalls (random, oversized for the memory
budget), hostile proofs (random keys and signatures, garbage and deeply nested JWTs), huge
fields, and the post-quantum suite. The rule (`targets.check_batch`): the ECALL succeeds, the
bad command is refused on its own (or, if a mutation left it valid, accepted as itself), the
good ones are accepted in sequence with verifying receipts, and a refused command changes no
state key but the good callers' own.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.attack.conftest import WorldBox
from tests.attack.enclave_world import INSTANCES, good_call
from tests.attack.mutations import HOSTILE_TOKENS
from tests.attack.profile import attack_settings
from tests.attack.targets import BadCommand, bad_command, build_command, check_batch
from veil.sdk.sealing import seal_plaintext


@pytest.mark.parametrize("instance_id", INSTANCES)
@attack_settings(300)
@given(rng=st.randoms(use_true_random=True))
def test_a_bad_command_is_refused_alone_and_changes_nothing(
    world_box: WorldBox, instance_id: str, rng: random.Random
) -> None:
    bad = bad_command(rng, world_box.world, instance_id)
    _, accepted = check_batch(rng, world_box.world, instance_id, bad)
    if accepted:
        world_box.reset()  # the mutation happened to be a valid command: it ran as itself


@pytest.mark.parametrize("name", sorted(HOSTILE_TOKENS))
def test_a_hostile_oauth2_token_is_unauthenticated_and_fails_alone(world_box: WorldBox, name: str) -> None:
    world = world_box.world
    sender = world.client("o")
    command = build_command(sender, good_call("o").SerializeToString())
    command.auth.oauth2.jwt = HOSTILE_TOKENS[name]
    sealed = seal_plaintext(world.harness.keys, command.SerializeToString(), instance_id="o")
    bad = BadCommand("hostile-jwt", sealed, command.response_key, command.request_id)
    label, accepted = check_batch(random.Random(0), world, "o", bad)
    assert not accepted
    assert label == "hostile-jwt:UNAUTHENTICATED"  # opened with our response key: a sealed refusal
