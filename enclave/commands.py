"""Client commands at the enclave boundary: open a SealedCommand, seal a CommandResponse.

A command that cannot be opened (HPKE failure, not a Command, no usable response key, another
instance, a bad request id) can only be answered in the clear, so that answer is one fixed
message. Everything after opening is
answered under the client's response key, which the host never sees.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from veil.enclave import crypto, wire
from veil.enclave.errors import INVALID_ARGUMENT, DecryptionError, EnclaveError
from veil.enclave.v1 import command_pb2, envelope_pb2

MAX_REQUEST_ID_SIZE = 64
_UNOPENABLE = "command could not be opened"


def open_command(
    keys: crypto.HpkeKeyPairs, instance_id: str, sealed: envelope_pb2.SealedCommand
) -> command_pb2.Command:
    """Decrypt and decode a sealed command for `instance_id`, or raise the fixed refusal."""
    try:
        plaintext = keys.open(
            sealed.suite,
            sealed.encapsulated_key,
            sealed.ciphertext,
            info=wire.COMMAND_INFO,
            aad=wire.command_aad(instance_id),
        )
        command = command_pb2.Command.FromString(plaintext)
    except (DecryptionError, DecodeError):
        raise EnclaveError(INVALID_ARGUMENT, _UNOPENABLE) from None
    # Without a usable response key, instance and request id, no answer can be sealed.
    if (
        len(command.response_key) != crypto.KEY_SIZE
        or command.instance_id != instance_id
        or not valid_request_id(command.request_id)
    ):
        raise EnclaveError(INVALID_ARGUMENT, _UNOPENABLE)
    return command


def valid_request_id(request_id: str) -> bool:
    """The one rule for a request id, which the gateway and the clients apply before anything is
    sent: printable, 1 to MAX_REQUEST_ID_SIZE bytes of UTF-8."""
    return 0 < len(request_id.encode("utf-8")) <= MAX_REQUEST_ID_SIZE and request_id.isprintable()


def seal_response(
    command: command_pb2.Command, result: bytes, receipt: envelope_pb2.Receipt | None = None
) -> bytes:
    """AES-256-GCM seal a CommandResponse under the command's response key."""
    response = command_pb2.CommandResponse(request_id=command.request_id, result=result, receipt=receipt)
    return crypto.seal_blob(
        command.response_key,
        response.SerializeToString(deterministic=True),
        wire.response_aad(command.instance_id, command.request_id),
    )


def open_response(
    response_key: bytes, sealed: bytes, instance_id: str, request_id: str
) -> command_pb2.CommandResponse:
    """Client side: open a sealed response (raises DecryptionError)."""
    plaintext = crypto.open_blob(response_key, sealed, wire.response_aad(instance_id, request_id))
    return command_pb2.CommandResponse.FromString(plaintext)


def open_held(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Host side: unwrap a held answer (aad: `wire.held_response_aad` or `held_read_aad`);
    raises DecryptionError."""
    return crypto.open_blob(key, blob, aad)
