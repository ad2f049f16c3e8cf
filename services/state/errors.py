"""State-service domain errors, and the mapping of enclave refusals to them.

Every error is a `VeilError`, so the shared interceptor turns it into a gRPC status with
`google.rpc.ErrorInfo`. An enclave refusal keeps its code on the way out: in particular
RESOURCE_EXHAUSTED (the enclave memory budget) reaches the client unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from veil.enclave.v1 import error_pb2
from veil.services.common.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VeilError,
)


class StoreError(Unavailable):
    """The database failed or is unreachable; the operation may be retried."""

    default_reason = "STORE_UNAVAILABLE"


class SequenceConflict(StoreError):
    """An append does not continue the stored log (duplicate or gap): another writer, or a host bug."""

    default_reason = "SEQUENCE_CONFLICT"


class RecoveryRefused(FailedPrecondition):
    """Persisted state cannot be trusted (rollback, broken chain, tampering); the service refuses to serve.

    The message and metadata name the instance and the sequence where the check failed.
    """

    default_reason = "RECOVERY_REFUSED"

    def __init__(self, instance_id: str, sequence: int, why: str) -> None:
        super().__init__(
            f"instance {instance_id!r} at sequence {sequence}: {why}",
            metadata={"instance_id": instance_id, "sequence": str(sequence)},
        )
        self.instance_id = instance_id
        self.sequence = sequence
        self.why = why


class NotServing(Unavailable):
    """The service has not finished recovery (or has failed); the gateway should retry elsewhere or later."""

    default_reason = "NOT_SERVING"

    @classmethod
    def moved(cls, instance_id: str) -> NotServing:
        """For a command of an instance this host no longer serves (its lease was lost)."""
        return cls(f"instance {instance_id!r} moved to another replica; retry with the same request_id")


_ECALL_ERRORS: Mapping[int, type[VeilError]] = {
    error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT: InvalidArgument,
    error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION: FailedPrecondition,
    error_pb2.ECALL_ERROR_CODE_NOT_FOUND: NotFound,
    error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED: ResourceExhausted,
    error_pb2.ECALL_ERROR_CODE_DATA_LOSS: DataLoss,
    error_pb2.ECALL_ERROR_CODE_ALREADY_EXISTS: AlreadyExists,
    error_pb2.ECALL_ERROR_CODE_PERMISSION_DENIED: PermissionDenied,
    error_pb2.ECALL_ERROR_CODE_UNAUTHENTICATED: Unauthenticated,
    error_pb2.ECALL_ERROR_CODE_ABORTED: Aborted,
}


def from_ecall(code: int, message: str, *, method: str = "") -> VeilError:
    """The domain error for an enclave refusal; unknown codes and INTERNAL are not passed through."""
    cls = _ECALL_ERRORS.get(code)
    metadata = {"ecall": method} if method else {}
    if cls is None:
        # An enclave bug or an unknown code: no internal detail to the caller.
        return Unavailable("the enclave could not serve the call", reason="ENCLAVE_ERROR", metadata=metadata)
    reason = error_pb2.EcallErrorCode.Name(error_pb2.EcallErrorCode.ValueType(code)).removeprefix(
        "ECALL_ERROR_CODE_"
    )
    return cls(message or reason.lower(), reason=reason, metadata=metadata)


def from_outcome_error(code: int, message: str) -> VeilError:
    """The error for a command the enclave did not execute at all (CommandOutcome.error).

    Besides the memory budget (RESOURCE_EXHAUSTED, passed through), that is a command the
    enclave could not open, most often one sealed to an enclave incarnation that has since
    restarted (new keys): the reason says so, and the client re-reads the attestation bundle
    and seals the same command (same counter) again.
    """
    if code == error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT:
        return InvalidArgument(
            f"{message}; if the enclave restarted, seal it again to the keys of GetAttestation",
            reason="COMMAND_UNOPENABLE",
        )
    return from_ecall(code, message)
