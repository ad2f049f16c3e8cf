"""The untrusted host's client for the enclave: one typed method per ECALL.

Two transports carry the same serialized EcallFrame/EcallReply bytes:

* `EnclaveHost.spawn(options)` spawns `python -m veil.enclave.runner` and talks length-prefixed
  frames over its stdin/stdout (the production shape: the host holds no reference to enclave
  memory; under SGX the runner runs inside Gramine);
* `EnclaveHost.in_process(options)` / `EnclaveHost.from_dispatcher(d)` call the dispatcher
  directly, for unit tests.

Calls are serialized by a lock (one ECALL at a time). A refused call raises `EnclaveCallError`
with the enclave's code and message; a dead runner raises `EnclaveUnavailableError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from veil.enclave import framing
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.runner import RunnerOptions, build_enclave
from veil.enclave.v1 import ecall_pb2, envelope_pb2, error_pb2

ResponseT = TypeVar("ResponseT", bound=Message)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _serialized(entries: Sequence[bytes | envelope_pb2.LogEntry]) -> list[bytes]:
    return [e if isinstance(e, bytes) else e.SerializeToString() for e in entries]


class EnclaveCallError(Exception):
    """The enclave refused a call; nothing changed inside it."""

    def __init__(self, method: str, error: error_pb2.EcallError) -> None:
        self.method = method
        self.code = error.code
        self.code_name = error_pb2.EcallErrorCode.Name(error.code)
        self.message = error.message
        super().__init__(f"{method}: {self.code_name}: {error.message}")


class EnclaveUnavailableError(Exception):
    """The enclave runner is gone or the pipe broke."""


class _Transport:
    def roundtrip(self, frame: bytes) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release the transport."""


class _InProcess(_Transport):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def roundtrip(self, frame: bytes) -> bytes:
        return self.dispatcher.handle(frame)


_PIPE_SIZE = 1024 * 1024


class _Subprocess(_Transport):
    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None, cwd: Path | None) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - argv is built from our own options
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        # 1 MiB instead of 64 KiB: a Restore frame of many MB crosses in fewer wake-ups (12 MB:
        # 17 -> 7 ms once warm). Best effort: the kernel may refuse an unprivileged user more.
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)

    def roundtrip(self, frame: bytes) -> bytes:
        stdin, stdout = self.process.stdin, self.process.stdout
        if stdin is None or stdout is None:
            raise EnclaveUnavailableError("enclave runner pipes are closed")
        try:
            framing.write_frame(stdin, frame)
            reply = framing.read_frame(stdout)
        except (OSError, framing.FramingError) as error:
            raise EnclaveUnavailableError(f"enclave runner connection broken: {error}") from error
        if reply is None:
            raise EnclaveUnavailableError(f"enclave runner exited (code {self.process.poll()})")
        return reply

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # end of input: the runner exits cleanly
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class EnclaveHost:
    """Typed, thread-safe access to one enclave."""

    def __init__(self, transport: _Transport) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self.ecalls = 0

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_dispatcher(cls, dispatcher: Dispatcher) -> EnclaveHost:
        """In-process host over an existing dispatcher (tests build their own providers)."""
        return cls(_InProcess(dispatcher))

    @classmethod
    def in_process(cls, options: RunnerOptions) -> EnclaveHost:
        """In-process host with the runner's providers (reads the same files the runner would)."""
        return cls.from_dispatcher(Dispatcher(build_enclave(options)))

    @classmethod
    def spawn(
        cls,
        options: RunnerOptions,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = _REPO_ROOT,
    ) -> EnclaveHost:
        """Spawn `python -m veil.enclave.runner` with `options` and talk to it over pipes."""
        return cls.spawn_argv([python, "-m", "veil.enclave.runner", *options.to_argv()], env=env, cwd=cwd)

    @classmethod
    def spawn_argv(
        cls, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = _REPO_ROOT
    ) -> EnclaveHost:
        """Spawn any runner command, e.g. `["gramine-sgx", "veil-enclave"]` on SGX hardware."""
        return cls(_Subprocess(argv, env, cwd))

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The runner process in subprocess mode."""
        return self._transport.process if isinstance(self._transport, _Subprocess) else None

    def close(self) -> None:
        """Stop the runner (subprocess mode) by closing its input."""
        with self._lock:
            self._transport.close()

    def __enter__(self) -> EnclaveHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the generic call ----------------------------------------------------------------

    def call(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
        """Make one ECALL; raises EnclaveCallError when refused."""
        frame = ecall_pb2.EcallFrame(method=method, payload=request.SerializeToString(deterministic=True))
        with self._lock:
            self.ecalls += 1
            raw = self._transport.roundtrip(frame.SerializeToString())
        try:
            reply = ecall_pb2.EcallReply.FromString(raw)
            if reply.HasField("error"):
                raise EnclaveCallError(method, reply.error)
            return response_type.FromString(reply.payload)
        except DecodeError as error:
            raise EnclaveUnavailableError(f"{method}: malformed reply from the enclave") from error

    # --- one method per ECALL ------------------------------------------------------------

    def initialize(
        self, memory_budget_bytes: int = 0, *, keyvault_release_public_key: bytes
    ) -> ecall_pb2.InitializeResponse:
        """Pin the keyvault's release key and generate the enclave's keys.

        `keyvault_release_public_key` (required, 32 bytes) is `GetJwks.release_public_key` of
        the keyvault: the enclave then accepts only key releases that keyvault signed. Returns
        the enclave's public keys (which echo the pinned key) and its measurement.
        """
        request = ecall_pb2.InitializeRequest(
            memory_budget_bytes=memory_budget_bytes, keyvault_release_public_key=keyvault_release_public_key
        )
        return self.call("Initialize", request, ecall_pb2.InitializeResponse)

    def get_quote(self, nonce: bytes) -> ecall_pb2.GetQuoteResponse:
        """A DCAP quote over the enclave's own keys and `nonce` (32 bytes), with those keys."""
        return self.call("GetQuote", ecall_pb2.GetQuoteRequest(nonce=nonce), ecall_pb2.GetQuoteResponse)

    def issue_challenge(self, instance_id: str, *, reads: bool = False) -> bytes:
        """A single-use challenge for the keyvault's head statement about `instance_id` (with
        `reads`: the read fence of a loaded instance, closing its open read round)."""
        request = ecall_pb2.IssueChallengeRequest(instance_id=instance_id, reads=reads)
        return self.call("IssueChallenge", request, ecall_pb2.IssueChallengeResponse).challenge

    def provision_key(self, instance_id: str, key_version: int, wrapped_key: envelope_pb2.WrappedKey) -> None:
        """Install a data key released by the keyvault: wrapped to the enclave, with its signature.

        `wrapped_key.signature` must carry `ReleaseKeyResponse.signature`; without it the
        enclave refuses the key (PERMISSION_DENIED).
        """
        request = ecall_pb2.ProvisionKeyRequest(
            instance_id=instance_id, key_version=key_version, wrapped_key=wrapped_key
        )
        self.call("ProvisionKey", request, ecall_pb2.ProvisionKeyResponse)

    def create_instance(
        self,
        instance_id: str,
        config: envelope_pb2.InstanceConfig,
        statement: envelope_pb2.HeadStatement,
        host_time_unix_ms: int,
    ) -> ecall_pb2.CreateInstanceResponse:
        """Create an instance the keyvault's `statement` says does not exist; persist the genesis
        entry and register it (the returned link) before acknowledging."""
        request = ecall_pb2.CreateInstanceRequest(
            instance_id=instance_id, config=config, statement=statement, host_time_unix_ms=host_time_unix_ms
        )
        return self.call("CreateInstance", request, ecall_pb2.CreateInstanceResponse)

    def execute_batch(
        self, instance_id: str, commands: Sequence[envelope_pb2.SealedCommand], host_time_unix_ms: int
    ) -> ecall_pb2.ExecuteBatchResponse:
        """Run a batch; persist `entries` (one transaction) before releasing `outcomes`."""
        request = ecall_pb2.ExecuteBatchRequest(
            instance_id=instance_id, commands=commands, host_time_unix_ms=host_time_unix_ms
        )
        return self.call("ExecuteBatch", request, ecall_pb2.ExecuteBatchResponse)

    def query(
        self, instance_id: str, command: envelope_pb2.SealedCommand, host_time_unix_ms: int
    ) -> ecall_pb2.QueryResponse:
        """Run a read-only command (its outcome may be held until a head is confirmed)."""
        request = ecall_pb2.QueryRequest(
            instance_id=instance_id, command=command, host_time_unix_ms=host_time_unix_ms
        )
        return self.call("Query", request, ecall_pb2.QueryResponse)

    def snapshot(self, instance_id: str) -> envelope_pb2.EncryptedSnapshot:
        """The instance's encrypted state at its head."""
        request = ecall_pb2.SnapshotRequest(instance_id=instance_id)
        return self.call("Snapshot", request, ecall_pb2.SnapshotResponse).snapshot

    def restore(
        self,
        instance_id: str,
        entries: Sequence[bytes | envelope_pb2.LogEntry],
        snapshot: envelope_pb2.EncryptedSnapshot | None = None,
        *,
        statement: envelope_pb2.HeadStatement,
        host_time_unix_ms: int,
        more: bool = False,
    ) -> ecall_pb2.RestoreResponse:
        """Load an instance from a snapshot (optional) and the entries after it.

        `statement` is GetCommitHead's answer for this enclave's key and its current challenge:
        the enclave refuses to restore without it, or a log that does not contain its head.
        `entries` are serialized LogEntry messages as stored (or messages, serialized here).
        `more`: the rest of the entries follow in `continue_restore` calls.
        """
        request = ecall_pb2.RestoreRequest(
            instance_id=instance_id,
            snapshot=snapshot,
            entries=_serialized(entries),
            statement=statement,
            host_time_unix_ms=host_time_unix_ms,
            more=more,
        )
        return self.call("Restore", request, ecall_pb2.RestoreResponse)

    def abandon_restore(self, instance_id: str) -> None:
        """Drop the restore of `instance_id` left open by a part with `more` (the rest could not
        be read); nothing when none is open."""
        request = ecall_pb2.RestoreRequest(instance_id=instance_id, abandon=True)
        self.call("Restore", request, ecall_pb2.RestoreResponse)

    def continue_restore(
        self, instance_id: str, entries: Sequence[bytes | envelope_pb2.LogEntry], *, more: bool = False
    ) -> ecall_pb2.RestoreResponse:
        """The next part of a restore begun with `more`; the last part (`more` False) loads it."""
        request = ecall_pb2.RestoreRequest(
            instance_id=instance_id, entries=_serialized(entries), more=more, continues=True
        )
        return self.call("Restore", request, ecall_pb2.RestoreResponse)

    def confirm_head(
        self,
        confirmation: envelope_pb2.HeadConfirmation | None = None,
        *,
        statement: envelope_pb2.HeadStatement | None = None,
    ) -> ecall_pb2.ConfirmHeadResponse:
        """Hand over the keyvault's word on a head (a confirmation, or a read fence statement);
        returns the keys it releases and, once registered, the instance's descriptor."""
        request = ecall_pb2.ConfirmHeadRequest(confirmation=confirmation, statement=statement)
        return self.call("ConfirmHead", request, ecall_pb2.ConfirmHeadResponse)

    def seal(self) -> bytes:
        """The provisioned data keys sealed to this platform and measurement."""
        return self.call("Seal", ecall_pb2.SealRequest(), ecall_pb2.SealResponse).sealed_blob

    def unseal(self, sealed_blob: bytes) -> list[str]:
        """Load a sealed key cache; returns the instances whose keys were loaded."""
        request = ecall_pb2.UnsealRequest(sealed_blob=sealed_blob)
        return list(self.call("Unseal", request, ecall_pb2.UnsealResponse).instance_ids)

    def get_status(self) -> ecall_pb2.GetStatusResponse:
        """Measurement, memory use and budget, instances and heads."""
        return self.call("GetStatus", ecall_pb2.GetStatusRequest(), ecall_pb2.GetStatusResponse)
