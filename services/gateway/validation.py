"""Shape checks on public requests, before anything reaches a state replica.

The gateway cannot read a sealed command, but it can refuse what could never open: an
unknown HPKE suite, an encapsulated key of the wrong length, a ciphertext shorter than an
AEAD tag. Identifiers follow the state service's rules (instance ids as the enclave accepts
them, request ids of 1 to 64 bytes as the enclave takes them).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke

from veil.enclave.commands import MAX_REQUEST_ID_SIZE, valid_request_id
from veil.enclave.v1 import envelope_pb2
from veil.services.common.errors import InvalidArgument
from veil.services.common.instance_ids import is_instance_id

MAX_REQUEST_ID = MAX_REQUEST_ID_SIZE  # the enclave's limit on the id it seals
_AEAD_TAG = 16
_ENC_LENGTHS = {
    envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM: hpke.KEM.X25519.enc_length(),
    envelope_pb2.HPKE_SUITE_MLKEM768X25519_SHA256_AES128GCM: hpke.KEM.MLKEM768_X25519.enc_length(),
}


def instance_id(value: str, *, required: bool = True) -> str:
    """A valid instance id (or "" when not required and absent)."""
    if not value and not required:
        return value
    # The grammar every service shares: a copy here anchored with "$" let "coins\n" through,
    # past the instance's authentication plugin (looked up by the id) to the default one.
    if not is_instance_id(value):
        raise InvalidArgument(
            "instance_id must be lowercase letters, digits and dashes (1 to 63 characters)",
            metadata={"field": "instance_id"},
        )
    return value


def request_id(value: str) -> str:
    """A valid request id: printable, 1 to 64 bytes of UTF-8 (the enclave's limit on the id it
    seals: a longer one was forwarded, refused unsealed as "could not be opened", and re-sealed
    by the client under another id, which a rerun of the same id then did not find)."""
    if not valid_request_id(value):
        raise InvalidArgument(
            f"request_id must be printable and 1 to {MAX_REQUEST_ID} bytes of UTF-8",
            metadata={"field": "request_id"},
        )
    return value


def sealed_command(command: envelope_pb2.SealedCommand) -> envelope_pb2.SealedCommand:
    """A sealed command that could be opened by an enclave."""
    expected = _ENC_LENGTHS.get(command.suite)
    if expected is None:
        raise InvalidArgument(
            "command.suite is not a supported HPKE suite", metadata={"field": "command.suite"}
        )
    if len(command.encapsulated_key) != expected:
        raise InvalidArgument(
            f"command.encapsulated_key must be {expected} bytes for this suite",
            metadata={"field": "command.encapsulated_key"},
        )
    if len(command.ciphertext) <= _AEAD_TAG:
        raise InvalidArgument("command.ciphertext is too short", metadata={"field": "command.ciphertext"})
    return command
