"""A state server whose Ping(b"slow") takes 2 s, run as a real process by the shutdown test."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import grpc

from veil.services.common.config import ServiceConfig, TlsFiles
from veil.services.common.server import run_until_signalled
from veil.services.state.server import StateServicer, build_state_server
from veil.state.v1 import state_pb2


class _SlowState(StateServicer):
    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        if request.payload == b"slow":
            time.sleep(2.0)
        return state_pb2.PingResponse(payload=request.payload)


def main(pki: Path) -> None:
    config = ServiceConfig(
        service="state",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        tls=TlsFiles(pki / "state.pem", pki / "state-key.pem", pki / "ca.pem"),
        data_dir=pki.parent,
        grace_seconds=5.0,
    )
    servicer = _SlowState()
    server = build_state_server(config, servicer)
    server.start()
    server.set_serving(True)
    print(server.port, server.admin_port, flush=True)
    run_until_signalled(server, config.grace_seconds)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
