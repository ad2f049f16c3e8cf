"""`veil identity`: Ed25519 identities in DATA_DIR/identities/NAME.key (no mesh needed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli import output
from veil.cli.common import bind, data_dir_option, example, identity_name, report
from veil.sdk.identity import identity_paths, load_identity, new_identity

if TYPE_CHECKING:
    from veil.cli.common import Subcommands


def register(commands: Subcommands) -> None:
    identity = commands.add_parser("identity", help="Ed25519 identities (DATA_DIR/identities/NAME.key)")
    identity_commands = identity.add_subparsers(dest="identity_command", required=True)
    new = identity_commands.add_parser(
        "new", help="create an identity key pair", epilog=example("veil identity new alice")
    )
    new.add_argument("name", type=identity_name)
    new.add_argument("--force", action="store_true", help="replace an existing identity")
    show = identity_commands.add_parser(
        "show", help="print an identity's account", epilog=example("veil identity show alice")
    )
    show.add_argument("name")
    listing = identity_commands.add_parser(
        "list", help="list local identities", epilog=example("veil identity list")
    )
    for sub, handler in ((new, identity_new), (show, identity_show), (listing, identity_list)):
        data_dir_option(sub, "holds identities/")
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        bind(sub, handler)


def identity_new(args: argparse.Namespace) -> int:
    identity = new_identity(Path(args.data_dir), args.name, force=args.force)
    key_path, pub_path = identity_paths(Path(args.data_dir), args.name)
    document = {"name": args.name, "account": identity.account, "key": str(key_path), "public": str(pub_path)}
    return report(args, document, lambda: output.fields(document))


def identity_show(args: argparse.Namespace) -> int:
    identity = load_identity(Path(args.data_dir), args.name)
    document = {"name": args.name, "account": identity.account}
    return report(args, document, lambda: output.fields(document))


def identity_list(args: argparse.Namespace) -> int:
    directory = Path(args.data_dir) / "identities"
    rows = (
        sorted((p.stem, p.read_text().strip()) for p in directory.glob("*.pub")) if directory.is_dir() else []
    )
    document = {"identities": [{"name": n, "account": a} for n, a in rows]}
    return report(args, document, lambda: output.table(["NAME", "ACCOUNT"], rows))
