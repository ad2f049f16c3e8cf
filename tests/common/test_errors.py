"""Domain errors reach callers as statuses with ErrorInfo; unexpected errors leak nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import tls_for
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.errors import ResourceExhausted
from veil.services.common.server import build_server
from veil.services.state.server import AUTHORIZATION, SERVICE_NAME, StateServicer
from veil.state.v1 import state_pb2, state_pb2_grpc
from veil.status import error_info


class _FailingState(StateServicer):
    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        if request.payload == b"quota":
            raise ResourceExhausted("enclave memory budget exhausted", metadata={"budget_bytes": "100"})
        raise RuntimeError("secret internal detail /var/lib/veil")


@pytest.fixture
def stub(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path
) -> Iterator[state_pb2_grpc.StateServiceStub]:
    servicer = _FailingState()
    server = build_server(
        service_config("state"),
        register=lambda s: state_pb2_grpc.add_StateServiceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        authorization=AUTHORIZATION,
    )
    server.start()
    with secure_channel(f"127.0.0.1:{server.port}", tls_for(pki_dir, "gateway")) as channel:
        yield state_pb2_grpc.StateServiceStub(channel)
    server.stop(0)


def test_domain_error_maps_to_status_with_error_info(stub: state_pb2_grpc.StateServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Ping(state_pb2.PingRequest(payload=b"quota"), timeout=5)
    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert excinfo.value.details() == "enclave memory budget exhausted"
    info = error_info(excinfo.value)
    assert info is not None
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "RESOURCE_EXHAUSTED",
        "veil.dev",
        {"budget_bytes": "100"},
    )


def test_unexpected_error_is_internal_and_leaks_nothing(
    stub: state_pb2_grpc.StateServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Ping(state_pb2.PingRequest(payload=b"boom"), timeout=5)
    assert excinfo.value.code() == grpc.StatusCode.INTERNAL
    info = error_info(excinfo.value)
    assert info is not None
    assert info.reason == "INTERNAL"
    correlation_id = info.metadata["correlation_id"]
    assert excinfo.value.details() == f"internal error (correlation id {correlation_id})"
    assert "secret" not in str(excinfo.value)
    # The log names the same id next to the real exception, so an operator finds it.
    assert any(correlation_id in r.getMessage() and r.exc_info for r in caplog.records)
