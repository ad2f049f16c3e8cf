"""Gateway memory is bounded by bytes: many ~1 MiB Execute answers do not fill the pod.

A state replica stands in that accepts every command with a ~1 MiB sealed answer (as a vault
`get` through Execute can); 300 distinct requests through the real gateway on port 0 once
grew it by ~589 MiB (each answer kept twice: the request_id cache and the receipt replay).
"""

from __future__ import annotations

import gc
import itertools
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import config_on_free_ports, tls_for
from tests.gateway.support import execute_batch_over
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from veil.services.common.channels import secure_channel
from veil.services.common.config import ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.gateway import idempotency, receipts
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.server import GatewayServicer
from veil.services.gateway.server import create_server as create_gateway
from veil.services.state.server import build_state_server
from veil.state.v1 import state_pb2, state_pb2_grpc

ANSWER_BYTES = 1000 * 1024
REQUESTS = 300


class BigAnswers(state_pb2_grpc.StateServiceServicer):
    """Accepts every command with a fresh ~1 MiB sealed response."""

    def __init__(self) -> None:
        self._sequence = itertools.count(1)

    def Execute(self, request: state_pb2.ExecuteRequest, context: grpc.ServicerContext) -> Any:
        outcome = envelope_pb2.CommandOutcome(
            sealed_response=os.urandom(ANSWER_BYTES), accepted=True, sequence=next(self._sequence)
        )
        return state_pb2.ExecuteResponse(outcome=outcome)

    def ExecuteBatch(self, request: state_pb2.ExecuteBatchRequest, context: grpc.ServicerContext) -> Any:
        return execute_batch_over(self.Execute, request, context)


def _config(pki_dir: Path, tmp_path: Path, service: str) -> ServiceConfig:
    return config_on_free_ports(pki_dir, service, tmp_path / service, grace_seconds=0.5)


@pytest.fixture
def gateway(pki_dir: Path, tmp_path: Path) -> Iterator[VeilServer]:
    state = build_state_server(
        _config(pki_dir, tmp_path, "state"),
        BigAnswers(),  # type: ignore[abstract]  # only Execute is called
    )
    state.start()
    state.set_serving(True)
    config = GatewayConfig(
        state_addresses=(f"127.0.0.1:{state.port}",),
        keyvault_address="127.0.0.1:1",
        rate_per_second=10_000,
        burst=10_000,
    )
    server, _ = create_gateway(_config(pki_dir, tmp_path, "gateway"), gateway=config)
    server.start()
    yield server
    server.stop(0)
    state.stop(0)


def _servicer() -> GatewayServicer:
    (servicer,) = [o for o in gc.get_objects() if isinstance(o, GatewayServicer) and not o.hub._closed]
    return servicer


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_many_one_mib_answers_stay_under_the_byte_bounds(gateway: VeilServer, pki_dir: Path) -> None:
    servicer = _servicer()
    before = _rss_mib()
    channel = secure_channel(f"127.0.0.1:{gateway.port}", tls_for(pki_dir, "admin"))
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    try:
        for n in range(REQUESTS):
            request = gateway_pb2.ExecuteRequest(
                instance_id="vault",
                request_id=f"big-answer-{n:04d}",
                command=envelope_pb2.SealedCommand(
                    suite=envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM,
                    encapsulated_key=os.urandom(32),
                    ciphertext=os.urandom(64),
                ),
            )
            reply = stub.Execute(request, timeout=10)
            assert len(reply.outcome.sealed_response) == ANSWER_BYTES
    finally:
        channel.close()
    executions = servicer._executions
    # Answers over the per-entry cap are not kept; the bytes stay under the bound either way.
    assert executions.cached_bytes <= idempotency.DEFAULT_MAX_BYTES
    assert servicer.hub.kept_bytes <= receipts.DEFAULT_MAX_BYTES
    assert executions.cached_entries == 0  # every answer was over 256 KiB
    grown = _rss_mib() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{REQUESTS} x {ANSWER_BYTES} B answers: RSS +{grown:.0f} MiB (peak {peak:.0f} MiB)")
    assert grown < 200, f"the gateway process grew by {grown:.0f} MiB"


def test_small_answers_fill_the_cache_to_its_byte_bound_not_beyond() -> None:
    cache: idempotency.Deduplicator[bytes] = idempotency.Deduplicator(
        max_bytes=1024 * 1024, max_entry_bytes=200 * 1024, sizer=len
    )
    for n in range(100):
        cache.run(("i", f"r{n}", b"h"), lambda: os.urandom(100 * 1024))
    assert cache.cached_bytes <= 1024 * 1024
    assert 9 <= cache.cached_entries <= 10
    calls: list[int] = []

    def again() -> bytes:
        calls.append(1)
        return b""

    cache.run(("i", "r99", b"h"), again)  # the newest is still cached
    assert calls == []


def test_the_receipt_replay_buffer_is_bounded_across_instances() -> None:
    hub = receipts.ReceiptHub(max_bytes=1024 * 1024, max_item_bytes=300 * 1024)
    for n in range(50):
        outcome = envelope_pb2.CommandOutcome(
            sealed_response=os.urandom(200 * 1024), accepted=True, sequence=n
        )
        hub.publish(receipts.Committed(f"instance-{n % 7}", f"{'p' * 16}-{n}", "api-key:x:alice", outcome))
    assert hub.kept_bytes <= 1024 * 1024
    # The newest outcome of its instance is still there for replay.
    stream = hub.subscribe("instance-0", "p" * 16, "api-key:x:alice", replay=True, poll=0.01)
    first = next(stream)
    assert first is not None
    assert first.outcome.sequence == 49
    big = envelope_pb2.CommandOutcome(sealed_response=os.urandom(400 * 1024), accepted=True, sequence=99)
    before = hub.kept_bytes
    hub.publish(receipts.Committed("instance-0", "p" * 16 + "-big", "api-key:x:alice", big))
    assert hub.kept_bytes == before  # delivered live only
