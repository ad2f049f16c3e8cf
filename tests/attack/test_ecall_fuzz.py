"""The ECALL boundary against random, mutated and garbage frames: in-process and over the runner pipe.

In process, every frame goes through the real `Dispatcher` of an initialized enclave with four
instances and some history. The rule: a decodable `EcallReply` every time; a refusal carries a
known code (never INTERNAL) and leaves the enclave's state digest unchanged; a success changes
state only for CreateInstance, Restore or ConfirmHead (checked in `targets.check_ecall`).

Over the runner process (`python -m veil.enclave.runner`, 4-byte length-prefixed frames on
stdin/stdout): garbage frames are refused and the runner keeps serving, an oversized frame is
skipped with RESOURCE_EXHAUSTED, and a truncated stream ends the runner cleanly (exit 1, no
partial reply, no traceback).
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from tests.attack.conftest import WorldBox
from tests.attack.profile import attack_settings
from tests.attack.targets import ECALL_OK_CODES, check_ecall, ecall_input
from tests.enclave.support import (
    KEYVAULT_RELEASE_PUBLIC_KEY,
    NOW_MS,
    Client,
    config,
    head_statement,
    sim_runner,
    vault,
    wrap_key,
)
from veil.enclave import framing
from veil.enclave.runner import RunnerOptions
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2, error_pb2

#: The ECALL table as the contract defines it (the world's seeds cover the same set).
METHODS = sorted(ecall_pb2.DESCRIPTOR.services_by_name["EnclaveService"].methods_by_name)


@attack_settings(2000)
@given(rng=st.randoms(use_true_random=True))
def test_any_frame_gets_a_clear_answer_and_a_refusal_changes_nothing(
    world_box: WorldBox, rng: random.Random
) -> None:
    _, changed = check_ecall(world_box.world, ecall_input(rng, world_box.world))
    if changed:
        world_box.reset()  # a legitimate change (e.g. an older authentic log restored): start over


@pytest.mark.parametrize("method", METHODS)
@attack_settings(150)
@given(rng=st.randoms(use_true_random=True))
def test_every_method_refuses_bad_requests_cleanly(
    world_box: WorldBox, method: str, rng: random.Random
) -> None:
    label, changed = check_ecall(world_box.world, ecall_input(rng, world_box.world, method))
    assert label.startswith(f"{method}:")
    if changed:
        world_box.reset()


# --- the runner process ------------------------------------------------------------------------


class Runner:
    """`python -m veil.enclave.runner` over pipes, driven frame by frame (stderr captured)."""

    def __init__(self, options: RunnerOptions) -> None:
        repo = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "veil.enclave.runner", *options.to_argv()],
            cwd=repo,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout

    def send(self, frame: bytes) -> ecall_pb2.EcallReply:
        framing.write_frame(self.stdin, frame)
        return self.reply()

    def reply(self) -> ecall_pb2.EcallReply:
        raw = framing.read_frame(self.stdout)
        assert raw is not None, "the runner closed its output"
        return ecall_pb2.EcallReply.FromString(raw)

    def call(self, method: str, request: Message) -> bytes:
        reply = self.send(
            ecall_pb2.EcallFrame(method=method, payload=request.SerializeToString()).SerializeToString()
        )
        assert not reply.HasField("error"), reply.error
        return reply.payload

    def status(self) -> ecall_pb2.GetStatusResponse:
        return ecall_pb2.GetStatusResponse.FromString(self.call("GetStatus", ecall_pb2.GetStatusRequest()))

    def finish(self) -> tuple[int, bytes, bytes]:
        """Close stdin; the exit code, what was left on stdout, and stderr."""
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


@pytest.fixture
def runner(pki_dir: Path, tmp_path: Path) -> Iterator[Runner]:
    options = sim_runner(pki_dir, tmp_path / "p", memory_mb=8)
    runner = Runner(options)
    keys = ecall_pb2.InitializeResponse.FromString(
        runner.call(
            "Initialize", ecall_pb2.InitializeRequest(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY)
        )
    ).keys
    wrapped = wrap_key(keys, "v", 1, b"k" * 32)
    runner.call(
        "ProvisionKey", ecall_pb2.ProvisionKeyRequest(instance_id="v", key_version=1, wrapped_key=wrapped)
    )
    challenge = ecall_pb2.IssueChallengeResponse.FromString(
        runner.call("IssueChallenge", ecall_pb2.IssueChallengeRequest(instance_id="v"))
    ).challenge
    fast = config(acknowledgment=envelope_pb2.ACKNOWLEDGMENT_FAST)  # no keyvault here to confirm
    create = ecall_pb2.CreateInstanceRequest(
        instance_id="v", config=fast, statement=head_statement(keys, "v", challenge), host_time_unix_ms=NOW_MS
    )
    runner.call("CreateInstance", create)
    put = Client(keys, "v").seal(vault(put=apps_pb2.VaultPut(record_id="r", data=b"hello")))
    executed = ecall_pb2.ExecuteBatchResponse.FromString(
        runner.call("ExecuteBatch", ecall_pb2.ExecuteBatchRequest(instance_id="v", commands=[put.command]))
    )
    assert executed.outcomes[0].accepted
    yield runner
    if runner.process.poll() is None:
        runner.process.kill()
        runner.process.communicate()


GARBAGE = [
    b"",
    b"\xff\xff\xff\xff",
    bytes(range(256)),
    ecall_pb2.EcallFrame(method="ExecuteBatch", payload=b"\x12\xff\xff\xff\x7f").SerializeToString(),
    ecall_pb2.EcallFrame(method="Restore", payload=b"\x1a\x05\x0a\x03").SerializeToString(),
    ecall_pb2.EcallFrame(method="DumpKeys").SerializeToString(),
    ecall_pb2.EcallFrame(method="Unseal", payload=b"\x0a\x01\x01").SerializeToString(),
]


def test_garbage_frames_over_the_pipe_are_refused_and_the_runner_serves_on(runner: Runner) -> None:
    before = runner.status()
    codes = []
    for frame in GARBAGE:
        reply = runner.send(frame)
        assert reply.HasField("error"), reply
        assert reply.error.code in ECALL_OK_CODES, reply
        codes.append(error_pb2.EcallErrorCode.Name(reply.error.code))
    assert runner.status() == before  # same instances, heads and memory use
    assert set(codes) == {
        "ECALL_ERROR_CODE_INVALID_ARGUMENT",
        "ECALL_ERROR_CODE_UNIMPLEMENTED",
        "ECALL_ERROR_CODE_DATA_LOSS",
    }
    assert runner.finish()[0] == 0


def test_an_oversized_frame_is_skipped_with_resource_exhausted(runner: Runner) -> None:
    before = runner.status()
    size = framing.MAX_FRAME_SIZE + 1
    runner.stdin.write(size.to_bytes(4, "big"))
    chunk = bytes(1024 * 1024)
    for _ in range(size // len(chunk)):  # the runner reads and drops it as it arrives
        runner.stdin.write(chunk)
    runner.stdin.write(bytes(size % len(chunk)))
    runner.stdin.flush()
    reply = runner.reply()
    assert reply.error.code == error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED
    assert runner.status() == before  # the stream is still in step and nothing changed
    assert runner.finish()[0] == 0


@pytest.mark.parametrize(
    "tail",
    [
        (100).to_bytes(4, "big") + b"only ten b",  # a frame cut short
        b"\x00\x00",  # a length prefix cut short
        (2**32 - 1).to_bytes(4, "big") + bytes(1000),  # a 4 GiB prefix, then the stream ends
    ],
)
def test_a_truncated_stream_ends_the_runner_cleanly(runner: Runner, tail: bytes) -> None:
    runner.stdin.write(tail)
    code, out, err = runner.finish()
    assert code == 1
    assert out == b""  # no partial or garbage reply
    assert b"host connection broken" in err
    assert b"Traceback" not in err
