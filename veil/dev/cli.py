"""The operator nouns of the `veil` command: `pki init`, `up` and `bench`.

Registered by `veil.cli.main`; building their parsers imports nothing of the servers, and
their handlers import what they run on first use. With only the SDK installed (no
`veil[server]` extra) a noun whose code needs the servers' packages stops with one line
saying so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli.common import Handler, bind, bind_sdk, count, data_dir_option, example, whole_number
from veil.dev import bench

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

SERVER_EXTRA = "pip install 'veil[server]'"


def needs_server(noun: str, handler: Handler) -> Handler:
    """`handler`, failing with one clear line when a package of the server extra is missing."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ModuleNotFoundError as missing:
            if (missing.name or "").startswith("veil."):
                raise
            print(
                f"error: `veil {noun}` is operator tooling and needs the servers' packages "
                f"(no module {missing.name!r}): {SERVER_EXTRA}",
                file=sys.stderr,
            )
            return 1

    return run


def _pki_init(args: argparse.Namespace) -> int:
    from veil.dev.pki import PkiExistsError, init_pki

    directory = Path(args.data_dir) / "pki"
    try:
        written = init_pki(directory, force=args.force)
    except PkiExistsError as exc:
        if args.if_missing:
            print(f"pki: {directory} already initialised; kept")
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pki: wrote {len(written)} files to {directory}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from veil.dev.pki import init_pki
    from veil.dev.supervisor import up

    data_dir = Path(args.data_dir).resolve()  # the services run in other working directories
    if not (data_dir / "pki" / "ca.pem").exists():
        init_pki(data_dir / "pki")
    if args.nodes:
        from veil.dev.cluster import up_cluster

        return up_cluster(data_dir, args.nodes, args.port_offset)
    return up(data_dir, args.port_offset)


def register(commands: Subcommands) -> None:
    pki = commands.add_parser("pki", help="manage the dev PKI").add_subparsers(
        dest="pki_command", required=True
    )
    init = pki.add_parser(
        "init",
        help="write a CA, service and admin certificates, and the sim SGX PCK chain",
        epilog=example("veil pki init --if-missing"),
    )
    data_dir_option(init, "where pki/ is written")
    init.add_argument("--force", action="store_true", help="replace an existing PKI")
    init.add_argument("--if-missing", action="store_true", help="succeed without change if one exists")
    bind(init, needs_server("pki init", _pki_init))

    up = commands.add_parser(
        "up",
        help="start keyvault → state → gateway locally and supervise them",
        epilog=example(
            "veil up",
            "veil up --port-offset -20000 --data-dir mesh2   # beside another mesh",
            "veil up --nodes 3           # 2 keyvaults on PostgreSQL, 3 state hosts, 2 gateways",
        ),
    )
    data_dir_option(up, "the mesh's PKI, logs and stores")
    up.add_argument(
        "--port-offset",
        type=whole_number(-49000, 10000),
        default=0,
        help="shift every port by N (default 0: gateway 50051) to run beside another mesh; "
        "a negative N (e.g. -20000: gateway 30051) moves the ports below the kernel's ephemeral "
        "range, where an outgoing connection cannot take one",
    )
    up.add_argument(
        "--nodes",
        type=count(16),
        default=0,
        help="a local multi-node mesh instead: N state hosts (each its own machine), 2 keyvault "
        "replicas on the PostgreSQL at 127.0.0.1:5432 (database test, new schemas), 2 gateways "
        "(default 0: the single-machine mesh)",
    )
    bind(up, needs_server("up", _up))

    benchmark = commands.add_parser(
        "bench",
        help="confidential transactions/s against the transport baseline, on a running mesh",
        epilog=example("veil bench --clients 16 --seconds 10 --json"),
    )
    bench.add_arguments(benchmark)
    bind_sdk(benchmark, needs_server("bench", bench.bench_command))
