"""A bare two-hop gRPC relay (client -> proxy -> backend): the transport yardstick of `veil bench`.

Each hop is its own process running a `grpc.aio` server with one generic unary method on raw
bytes: no TLS, no interceptors, no protobuf, no authentication. The backend echoes the request;
the proxy forwards it to the backend over one long-lived channel and returns the answer. This is
the least a two-hop service mesh can do per call, so `confidential_tps / relay_tps` says how far
Veil's confidential path (two hops plus TLS, authentication, an enclave and a durable commit) is
from plain transport on the same machine.

    python -m veil.dev.relay backend              # prints "LISTENING <port>"
    python -m veil.dev.relay proxy --backend 127.0.0.1:<port>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from grpc import aio

#: The relay's one method; requests and answers are raw bytes.
METHOD = "/veil.dev.Relay/Echo"
SERVICE = "veil.dev.Relay"
_READY = "LISTENING "
_STARTUP_TIMEOUT_S = 30.0
_OPTIONS = [("grpc.max_receive_message_length", 4 << 20), ("grpc.max_send_message_length", 4 << 20)]


def _handler(behaviour: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


async def _serve(backend: str | None) -> None:
    server = aio.server(options=_OPTIONS)
    channel = aio.insecure_channel(backend, options=_OPTIONS) if backend else None
    if channel is None:

        async def echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
            return request

        server.add_generic_rpc_handlers((_handler(echo),))
    else:
        forward: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)

        async def relay(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
            answer: bytes = await forward(request, timeout=context.time_remaining())
            return answer

        server.add_generic_rpc_handlers((_handler(relay),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{_READY}{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    """`python -m veil.dev.relay backend|proxy`: serve until terminated."""
    parser = argparse.ArgumentParser(prog="python -m veil.dev.relay", description=__doc__)
    parser.add_argument("role", choices=("backend", "proxy"))
    parser.add_argument("--backend", help="host:port of the backend (proxy only)")
    args = parser.parse_args(argv)
    if (args.role == "proxy") != bool(args.backend):
        parser.error("--backend is required for the proxy and only for it")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.backend))


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(  # noqa: S603 - this module, by the running interpreter
        [sys.executable, "-m", "veil.dev.relay", *args], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # the child prints its port once it serves
    if not line.startswith(_READY):
        _stop(process)
        raise RuntimeError(f"the relay {args[0]} did not start (exit {process.poll()})")
    return process, f"127.0.0.1:{int(line.removeprefix(_READY))}"


@contextlib.contextmanager
def running_relay() -> Iterator[tuple[str, list[int]]]:
    """Start backend and proxy processes; yields (proxy address, their pids); stops them after."""
    processes: list[subprocess.Popen[str]] = []
    try:
        backend, backend_address = _start("backend")
        processes.append(backend)
        proxy, proxy_address = _start("proxy", "--backend", backend_address)
        processes.append(proxy)
        yield proxy_address, [p.pid for p in processes]
    finally:
        for process in processes:
            _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


if __name__ == "__main__":
    main()
