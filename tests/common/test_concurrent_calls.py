"""Every server bounds its calls in flight: past the bound a call is refused at once, not queued."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.conftest import tls_for
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.server import CONCURRENT_RPCS_PER_WORKER
from veil.services.state.server import StateServicer, build_state_server
from veil.state.v1 import state_pb2, state_pb2_grpc

WORKERS = 2
HOLD_S = 0.4


class _SlowPing(StateServicer):
    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        time.sleep(HOLD_S)
        return state_pb2.PingResponse(payload=request.payload)


def test_calls_past_the_bound_are_refused_at_once(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path
) -> None:
    server = build_state_server(service_config("state"), _SlowPing(), max_workers=WORKERS)
    server.start()
    server.set_serving(True)
    bound = CONCURRENT_RPCS_PER_WORKER * WORKERS
    channel = secure_channel(f"127.0.0.1:{server.port}", tls_for(pki_dir, "gateway"))
    stub = state_pb2_grpc.StateServiceStub(channel)
    try:
        stub.Ping(state_pb2.PingRequest(payload=b"warm"), timeout=10)
        started = time.monotonic()
        outcomes: Counter[str] = Counter()
        refused_after: list[float] = []

        def done(call: Any) -> None:
            code = call.code()
            outcomes[code.name] += 1
            if code != grpc.StatusCode.OK:
                refused_after.append(time.monotonic() - started)

        calls = [stub.Ping.future(state_pb2.PingRequest(payload=b"x"), timeout=30) for _ in range(bound + 6)]
        for call in calls:
            call.add_done_callback(done)
        for call in calls:
            call.exception()  # wait
    finally:
        channel.close()
        server.stop(0)
    assert outcomes == {"OK": bound, "RESOURCE_EXHAUSTED": 6}
    # Refused when they arrived, not after waiting for the queue ahead (bound / WORKERS * HOLD_S).
    assert max(refused_after) < HOLD_S * bound / WORKERS / 2
