"""The `veil` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from services.common.channels import wait_until_serving
from services.common.config import DEFAULT_DATA_DIR
from services.common.pki import PkiExistsError, init_pki

SERVICES = ("keyvault", "state", "gateway")


def _pki_init(args: argparse.Namespace) -> int:
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
    from client.supervisor import up

    data_dir = Path(args.data_dir)
    if not (data_dir / "pki" / "ca.pem").exists():
        init_pki(data_dir / "pki")
    return up(data_dir)


def _serve(args: argparse.Namespace) -> int:
    if args.service == "keyvault":
        from services.keyvault.server import main
    elif args.service == "state":
        from services.state.server import main
    else:
        from services.gateway.server import main
    return main()


def _wait(args: argparse.Namespace) -> int:
    logging.info("waiting up to %.0fs for %s at %s", args.timeout, args.service, args.address)
    try:
        wait_until_serving(args.address, label=args.service, timeout=args.timeout)
    except TimeoutError as exc:
        logging.error("%s (%s)", exc, args.service)
        return 1
    logging.info("%s at %s is SERVING", args.service, args.address)
    return 0


def _attest_verify(argv: list[str]) -> int:
    from services.keyvault.attestation.cli import verify_main

    return verify_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Veil: a confidential-computing gRPC mesh.")
    commands = parser.add_subparsers(dest="command", required=True)

    pki = commands.add_parser("pki", help="manage the dev PKI").add_subparsers(
        dest="pki_command", required=True
    )
    init = pki.add_parser(
        "init", help="write a CA, service and admin certificates, and the sim SGX PCK chain"
    )
    init.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    init.add_argument("--force", action="store_true", help="replace an existing PKI")
    init.add_argument("--if-missing", action="store_true", help="succeed without change if one exists")
    init.set_defaults(func=_pki_init)

    up = commands.add_parser("up", help="start keyvault → state → gateway locally and supervise them")
    up.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    up.set_defaults(func=_up)

    serve = commands.add_parser("serve", help="run one service in the foreground (container entry point)")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(func=_serve)

    wait = commands.add_parser("wait", help="block until a service's admin port reports SERVING")
    wait.add_argument("--address", required=True, help="HOST:PORT of the admin (plaintext health) port")
    wait.add_argument("--service", required=True, help="name used in log lines")
    wait.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    wait.set_defaults(func=_wait)

    attest = commands.add_parser("attest", help="attestation tools")
    attest_commands = attest.add_subparsers(dest="attest_command", required=True)
    verify = attest_commands.add_parser("verify", help="verify a DCAP quote v3", add_help=False)
    verify.add_argument("rest", nargs=argparse.REMAINDER)
    verify.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if argv[:2] == ["attest", "verify"]:
        return _attest_verify(argv[2:])
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
