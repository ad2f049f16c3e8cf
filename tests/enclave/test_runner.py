"""The ECALL boundary: the dispatcher's refusals, and the runner process over real pipes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import (
    KEYVAULT_RELEASE_PUBLIC_KEY,
    NOW_MS,
    Client,
    config,
    error_code,
    head_confirmation,
    head_statement,
    sim_runner,
    vault,
    wrap_key,
)
from veil.enclave import framing
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.runner import RunnerOptions, serve
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2, error_pb2
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost, EnclaveUnavailableError


def _reply(dispatcher: Dispatcher, frame: bytes) -> ecall_pb2.EcallReply:
    return ecall_pb2.EcallReply.FromString(dispatcher.handle(frame))


def test_unknown_and_malformed_calls_are_refused_and_change_nothing(make_enclave: MakeEnclave) -> None:
    enclave = make_enclave()
    dispatcher = Dispatcher(enclave)
    before = enclave.state_digest()
    unknown = _reply(dispatcher, ecall_pb2.EcallFrame(method="DumpKeys").SerializeToString())
    assert unknown.error.code == error_pb2.ECALL_ERROR_CODE_UNIMPLEMENTED
    assert not unknown.payload
    garbage = _reply(dispatcher, b"\xff\xff\xff")
    assert garbage.error.code == error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT
    bad_payload = _reply(
        dispatcher, ecall_pb2.EcallFrame(method="Initialize", payload=b"\x0a\xff").SerializeToString()
    )
    assert bad_payload.error.code == error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT
    assert "InitializeRequest" in bad_payload.error.message
    assert enclave.state_digest() == before

    host = EnclaveHost.from_dispatcher(dispatcher)
    with pytest.raises(EnclaveCallError, match="FAILED_PRECONDITION: enclave not initialized"):
        host.get_quote(bytes(32))
    host.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY)
    with pytest.raises(EnclaveCallError, match="FAILED_PRECONDITION: enclave already initialized"):
        host.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY)
    with pytest.raises(EnclaveCallError, match="NOT_FOUND"):
        host.snapshot("nope")
    with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT"):
        host.create_instance("Not_Valid", config(), envelope_pb2.HeadStatement(), NOW_MS)
    assert host.ecalls == 5


def test_a_bug_is_reported_as_internal_without_detail(make_enclave: MakeEnclave) -> None:
    enclave = make_enclave()

    def broken(request: object) -> object:
        raise KeyError("secret detail")

    dispatcher = Dispatcher(enclave)
    dispatcher._table = {"GetStatus": (ecall_pb2.GetStatusRequest, broken)}  # type: ignore[dict-item]
    reply = _reply(dispatcher, ecall_pb2.EcallFrame(method="GetStatus").SerializeToString())
    assert reply.error.code == error_pb2.ECALL_ERROR_CODE_INTERNAL
    assert reply.error.message == "internal error"


def test_serve_answers_every_frame_and_survives_an_oversized_one(make_enclave: MakeEnclave) -> None:
    frames = io.BytesIO()
    status = ecall_pb2.EcallFrame(method="GetStatus").SerializeToString()
    for payload in (status, b"x" * 100, status):
        frames.write(len(payload).to_bytes(4, "big") + payload)
    frames.seek(0)
    out = io.BytesIO()
    serve(Dispatcher(make_enclave()), frames, out, max_frame_size=64)
    out.seek(0)
    replies = []
    while (frame := framing.read_frame(out)) is not None:
        replies.append(ecall_pb2.EcallReply.FromString(frame))
    assert [r.error.code for r in replies] == [0, error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, 0]


def test_truncated_stream_is_a_framing_error() -> None:
    with pytest.raises(framing.FramingError):
        framing.read_frame(io.BytesIO(b"\x00\x00\x00\x09abc"))
    assert framing.read_frame(io.BytesIO(b"")) is None


@pytest.mark.parametrize(
    ("arguments", "status", "says"),
    [
        ([], 2, b"--quote-provider"),  # no providers: a usage error
        (["--quote-provider", "sim", "--seal-provider", "sim"], 1, b"refusing to start"),  # no sim files
    ],
)
def test_runner_refuses_to_start_without_explicit_providers(
    arguments: list[str], status: int, says: bytes
) -> None:
    done = subprocess.run(  # our interpreter, our module
        [sys.executable, "-m", "veil.enclave.runner", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == status
    assert done.stdout == b""  # nothing on the frame pipe
    assert says in done.stderr


def test_runner_subprocess_round_trip(pki_dir: Path, tmp_path: Path) -> None:
    options = sim_runner(pki_dir, tmp_path / "node-a.secret", memory_mb=8)
    with EnclaveHost.spawn(options) as host:
        keys = host.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY).keys
        assert host.get_status().memory_budget_bytes == 8 * 1024 * 1024
        assert (tmp_path / "node-a.secret").stat().st_mode & 0o777 == 0o600
        host.provision_key("v", 1, wrap_key(keys, "v", 1, b"k" * 32))
        # Fast acknowledgment: answers come back at once (no keyvault here to confirm heads).
        fast = config(acknowledgment=envelope_pb2.ACKNOWLEDGMENT_FAST)
        created = host.create_instance(
            "v", fast, head_statement(keys, "v", host.issue_challenge("v")), NOW_MS
        )
        # Registered (the test keyvault confirms the genesis to this boot): a fast instance answers now.
        confirmed = host.confirm_head(head_confirmation("v", created.link.head, keys.signing_public_key))
        assert confirmed.descriptor.instance_id == "v"
        client = Client(keys, "v")
        sealed = client.seal(vault(put=apps_pb2.VaultPut(record_id="r", data=b"hello")))
        (outcome,) = host.execute_batch("v", [sealed.command], 0).outcomes
        assert outcome.accepted
        assert error_code(client.read(sealed, outcome)) == "OK"
        query = client.seal(vault(get=apps_pb2.VaultGet(owner="alice", record_id="r")), counter=0)
        assert client.read(query, host.query("v", query.command, 0).outcome).result.vault.get.data == b"hello"
        assert len(host.get_quote(b"\x01" * 32).quote) > 1000
        blob = host.seal()
        with pytest.raises(EnclaveCallError, match="UNIMPLEMENTED"):
            host.call("Nope", ecall_pb2.GetStatusRequest(), ecall_pb2.GetStatusResponse)
        process = host.process
        assert process is not None
    assert process.returncode == 0  # clean exit at end of input

    # A restarted runner on the same simulated node can unseal; another node cannot.
    with EnclaveHost.spawn(options) as again:
        again.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY)
        assert again.unseal(blob) == ["v"]
    other = sim_runner(pki_dir, tmp_path / "node-b.secret")
    with EnclaveHost.spawn(other) as elsewhere:
        elsewhere.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY)
        with pytest.raises(EnclaveCallError, match="DATA_LOSS"):
            elsewhere.unseal(blob)


def test_dead_runner_is_reported(pki_dir: Path, tmp_path: Path) -> None:
    options = sim_runner(pki_dir, tmp_path / "s")
    host = EnclaveHost.spawn(options)
    process = host.process
    assert process is not None
    process.kill()
    process.wait()
    with pytest.raises(EnclaveUnavailableError):
        host.get_status()
    host.close()


def test_in_process_mode_builds_the_same_enclave_as_the_runner(
    pki_dir: Path, tmp_path: Path, mrenclave: bytes
) -> None:
    options = sim_runner(pki_dir, tmp_path / "p")
    host = EnclaveHost.in_process(options)
    assert host.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY).mrenclave == mrenclave
    assert host.get_status().memory_budget_bytes == 96 * 1024 * 1024
    with pytest.raises(ValueError, match="--pck-dir"):
        EnclaveHost.in_process(RunnerOptions(quote_provider="sim", seal_provider="sim"))
