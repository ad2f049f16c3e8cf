"""Enclave refusals keep their meaning on the way to the gateway; enclave bugs stay hidden."""

from __future__ import annotations

import grpc
import pytest

from veil.enclave.v1 import error_pb2
from veil.services.state.errors import RecoveryRefused, from_ecall, from_outcome_error


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (error_pb2.ECALL_ERROR_CODE_NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (error_pb2.ECALL_ERROR_CODE_ABORTED, grpc.StatusCode.ABORTED),
        (error_pb2.ECALL_ERROR_CODE_DATA_LOSS, grpc.StatusCode.DATA_LOSS),
        (error_pb2.ECALL_ERROR_CODE_ALREADY_EXISTS, grpc.StatusCode.ALREADY_EXISTS),
    ],
)
def test_enclave_codes_pass_through(code: int, status: grpc.StatusCode) -> None:
    error = from_ecall(code, "the enclave said why", method="ExecuteBatch")
    assert error.code == status
    assert error.message == "the enclave said why"
    assert error.metadata == {"ecall": "ExecuteBatch"}


@pytest.mark.parametrize(
    "code", [error_pb2.ECALL_ERROR_CODE_INTERNAL, error_pb2.ECALL_ERROR_CODE_UNIMPLEMENTED, 99]
)
def test_enclave_bugs_are_not_passed_through(code: int) -> None:
    error = from_ecall(code, "stack detail")
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "stack detail" not in error.message


def test_an_unopenable_command_says_how_to_recover() -> None:
    error = from_outcome_error(error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT, "command could not be opened")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "COMMAND_UNOPENABLE"
    assert "GetAttestation" in error.message
    budget = from_outcome_error(error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, "budget")
    assert budget.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_refusal_names_instance_and_sequence() -> None:
    error = RecoveryRefused("tokens", 42, "rollback")
    assert error.message == "instance 'tokens' at sequence 42: rollback"
    assert error.metadata == {"instance_id": "tokens", "sequence": "42"}
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
