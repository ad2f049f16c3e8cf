"""The `veil` command line.

Mesh operations (`pki init`, `up`, `serve`, `wait`, `attest verify`) live here; the
SDK-backed commands (`identity`, `instance`, `vault`, `token`, `ballot`, `attest show`) are in
client.commands, imported only when the parser is built.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from veil.dev.pki import PkiExistsError, init_pki
from veil.services.common.channels import wait_until_serving
from veil.services.common.config import DEFAULT_DATA_DIR

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
    from veil.dev.supervisor import up

    data_dir = Path(args.data_dir)
    if not (data_dir / "pki" / "ca.pem").exists():
        init_pki(data_dir / "pki")
    return up(data_dir, args.port_offset)


def _serve(args: argparse.Namespace) -> int:
    if args.service == "keyvault":
        from veil.services.keyvault.server import main
    elif args.service == "state":
        from veil.services.state.server import main
    else:
        from veil.services.gateway.server import main
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
    from veil.cli.attest import verify_main

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
    up.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="shift every port by N (default 0: gateway 50051) to run beside another mesh",
    )
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
    show = attest_commands.add_parser("show", help="verify the enclave behind the gateway and explain it")
    show.add_argument(
        "--instance", default="", help="the instance whose enclave to show (default shard if empty)"
    )
    _sdk(show, commands_module().attest_show)

    _add_sdk_commands(commands)

    bench = commands.add_parser(
        "bench", help="confidential transactions/s against the transport baseline, on a running mesh"
    )
    _bench(bench)
    return parser


def _bench(parser: argparse.ArgumentParser) -> None:
    from veil.dev import bench

    bench.add_arguments(parser)
    _sdk(parser, bench.bench_command)


def commands_module() -> Any:
    """client.commands, imported on first use (keeps `veil serve` light)."""
    import client.commands

    return client.commands


def _sdk(parser: argparse.ArgumentParser, handler: Any, *, identity: bool = False) -> None:
    """Give `parser` the connection options (and identity options) and bind `handler`."""
    module = commands_module()
    module.connection_options(parser)
    if identity:
        module.identity_option(parser)
    parser.set_defaults(func=lambda args: module.run(handler, args))


def _add_sdk_commands(commands: Any) -> None:
    for add in (_identity_commands, _instance_commands, _vault_commands, _token_commands, _ballot_commands):
        add(commands, commands_module())


def _identity_commands(commands: Any, module: Any) -> None:
    identity = commands.add_parser("identity", help="Ed25519 identities (DATA_DIR/identities/NAME.key)")
    identity_commands = identity.add_subparsers(dest="identity_command", required=True)
    new = identity_commands.add_parser("new", help="create an identity key pair")
    new.add_argument("name")
    new.add_argument("--force", action="store_true", help="replace an existing identity")
    show = identity_commands.add_parser("show", help="print an identity's account")
    show.add_argument("name")
    listing = identity_commands.add_parser("list", help="list local identities")
    for sub, handler in (
        (new, module.identity_new),
        (show, module.identity_show),
        (listing, module.identity_list),
    ):
        sub.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        sub.set_defaults(func=lambda args, h=handler: module.run(h, args))


def _instance_commands(commands: Any, module: Any) -> None:
    instance = commands.add_parser("instance", help="create and list app instances (admin certificate)")
    instance_commands = instance.add_subparsers(dest="instance_command", required=True)
    create = instance_commands.add_parser("create", help="create an app instance")
    create.add_argument("instance", help="instance id (lowercase letters, digits, dashes)")
    create.add_argument("--app", required=True, choices=sorted(module.APPS))
    create.add_argument("--auth", default="signature", choices=sorted(module.SCHEMES))
    create.add_argument("--token-issuer", help="token app: the minting identity or account (default: --as)")
    create.add_argument("--oauth2-issuer")
    create.add_argument("--oauth2-audience")
    create.add_argument("--oauth2-jwks", help="JWKS file of the OAuth2 issuer")
    _sdk(create, module.instance_create, identity=True)
    _sdk(instance_commands.add_parser("list", help="list instances across shards"), module.instance_list)
    pin = instance_commands.add_parser(
        "pin", help="pin an instance's genesis: later commands refuse any other instance under its id"
    )
    pin.add_argument("instance")
    pin.add_argument("--genesis", help="the genesis hash (hex) you expect, e.g. from its creator")
    _sdk(pin, module.instance_pin)


def _vault_commands(commands: Any, module: Any) -> None:
    vault = commands.add_parser("vault", help="personal-data records").add_subparsers(
        dest="vault_command", required=True
    )
    put = vault.add_parser("put", help="create or replace one of your records")
    put.add_argument("instance")
    put.add_argument("record")
    source = put.add_mutually_exclusive_group()
    source.add_argument("--data", help="the content as text (default: stdin)")
    source.add_argument("--file", help="read the content from a file")
    _sdk(put, module.vault_put, identity=True)
    get = vault.add_parser("get", help="read a record you own or that was shared with you")
    get.add_argument("instance")
    get.add_argument("record")
    get.add_argument("--owner", help="the owner's identity name or account (default: you)")
    get.add_argument("--out", help="write the content to a file")
    _sdk(get, module.vault_get, identity=True)
    for verb, handler in (("share", module.vault_share), ("revoke", module.vault_revoke)):
        change = vault.add_parser(verb, help=f"{verb} read access to one of your records")
        change.add_argument("instance")
        change.add_argument("record")
        change.add_argument("reader", help="identity name or account")
        _sdk(change, handler, identity=True)
    delete = vault.add_parser("delete", help="erase one of your records")
    delete.add_argument("instance")
    delete.add_argument("record")
    _sdk(delete, module.vault_delete, identity=True)


def _token_commands(commands: Any, module: Any) -> None:
    token = commands.add_parser("token", help="confidential balances").add_subparsers(
        dest="token_command", required=True
    )
    mint = token.add_parser("mint", help="create tokens (issuer identity)")
    mint.add_argument("instance")
    mint.add_argument("to", help="identity name or account")
    mint.add_argument("amount", type=int)
    _sdk(mint, module.token_mint, identity=True)
    transfer = token.add_parser("transfer", help="send tokens (one, or many from a CSV of to,amount)")
    transfer.add_argument("instance")
    transfer.add_argument("to", nargs="?", help="identity name or account")
    transfer.add_argument("amount", nargs="?", type=int)
    transfer.add_argument("--from-csv", help="CSV file with rows to,amount; shows a progress bar")
    _sdk(transfer, module.token_transfer, identity=True)
    for verb, handler, text in (
        ("balance", module.token_balance, "your balance"),
        ("supply", module.token_supply, "the total supply"),
    ):
        read = token.add_parser(verb, help=text)
        read.add_argument("instance")
        _sdk(read, handler, identity=True)


def _ballot_commands(commands: Any, module: Any) -> None:
    ballot = commands.add_parser("ballot", help="secret ballots").add_subparsers(
        dest="ballot_command", required=True
    )
    open_ballot = ballot.add_parser("create", help="open a ballot (you become its creator)")
    open_ballot.add_argument("instance")
    open_ballot.add_argument("ballot")
    open_ballot.add_argument("--question", required=True)
    open_ballot.add_argument("--option", action="append", required=True, help="a choice (repeat, 2 to 64)")
    open_ballot.add_argument(
        "--voter", action="append", default=[], help="eligible voter (repeat; default: all)"
    )
    open_ballot.add_argument(
        "--min-votes",
        type=int,
        default=0,
        help="votes needed to close; raises, never lowers, the instance's minimum (default 3)",
    )
    _sdk(open_ballot, module.ballot_create, identity=True)
    vote = ballot.add_parser("vote", help="cast or replace your vote; keeps a receipt to verify later")
    vote.add_argument("instance")
    vote.add_argument("ballot")
    vote.add_argument("option", help="option index or label")
    _sdk(vote, module.ballot_vote, identity=True)
    for verb, handler, text in (
        ("close", module.ballot_close, "end voting (creator) and print the tally"),
        ("tally", module.ballot_tally, "print a closed ballot's tally"),
    ):
        sub = ballot.add_parser(verb, help=text)
        sub.add_argument("instance")
        sub.add_argument("ballot")
        _sdk(sub, handler, identity=True)
    verify = ballot.add_parser("verify-receipt", help="check that your vote is counted in the tally")
    verify.add_argument("instance")
    verify.add_argument("ballot")
    verify.add_argument("--receipt", help="vote receipt file (default: the one `vote` saved)")
    _sdk(verify, module.ballot_verify_receipt, identity=True)


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
