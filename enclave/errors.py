"""The enclave's two exception types.

`EnclaveError` is a refusal the dispatcher turns into an `EcallError` (code + plain reason);
`DecryptionError` is the single opaque failure of every decryption, whatever went wrong, so
no ciphertext oracle tells an attacker which check failed.
"""

from __future__ import annotations

from veil.enclave.v1 import error_pb2

Code = error_pb2.EcallErrorCode

INVALID_ARGUMENT = error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT
UNIMPLEMENTED = error_pb2.ECALL_ERROR_CODE_UNIMPLEMENTED
FAILED_PRECONDITION = error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION
NOT_FOUND = error_pb2.ECALL_ERROR_CODE_NOT_FOUND
RESOURCE_EXHAUSTED = error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED
DATA_LOSS = error_pb2.ECALL_ERROR_CODE_DATA_LOSS
ALREADY_EXISTS = error_pb2.ECALL_ERROR_CODE_ALREADY_EXISTS
PERMISSION_DENIED = error_pb2.ECALL_ERROR_CODE_PERMISSION_DENIED
UNAUTHENTICATED = error_pb2.ECALL_ERROR_CODE_UNAUTHENTICATED
ABORTED = error_pb2.ECALL_ERROR_CODE_ABORTED
INTERNAL = error_pb2.ECALL_ERROR_CODE_INTERNAL


class EnclaveError(Exception):
    """A refused call or command: `code` classifies it, `message` explains it without secrets.

    `may_run_later` marks a refusal the command's bytes do not decide alone (the host's budget
    or clock): the same sealing may still be accepted, so its client must not take it as final.
    """

    def __init__(
        self, code: error_pb2.EcallErrorCode.ValueType, message: str, *, may_run_later: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.may_run_later = may_run_later

    def to_proto(self) -> error_pb2.EcallError:
        """The wire form of this error."""
        return error_pb2.EcallError(code=self.code, message=self.message)


class DecryptionError(Exception):
    """Any decryption failure. The message never varies."""

    def __init__(self) -> None:
        super().__init__("decryption failed")
