"""`veil contact`: names for other people's accounts (DATA_DIR/identities/contacts.json, no mesh).

A transfer, a share or a ballot voter names a local identity, a contact or a 64-hex account;
a contact is how a name you type reaches an account you were given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli import output
from veil.cli.common import bind, data_dir_option, example, report
from veil.sdk.contacts import add_contact, load_contacts, remove_contact

if TYPE_CHECKING:
    from veil.cli.common import Subcommands


def register(commands: Subcommands) -> None:
    contact = commands.add_parser(
        "contact",
        help="names for other people's accounts",
        epilog=example("veil contact add dana 3f…(64 hex)"),
    )
    contact_commands = contact.add_subparsers(dest="contact_command", required=True)
    add = contact_commands.add_parser(
        "add", help="name an account", epilog=example("veil contact add dana $(cat dana.pub)")
    )
    add.add_argument("name")
    add.add_argument("account", help="64 hex characters (an Ed25519 public key)")
    add.add_argument(
        "--any-form",
        action="store_true",
        help="accept an account that is not a key (an OAuth2 subject, an anonymous account)",
    )
    listing = contact_commands.add_parser("list", help="list contacts", epilog=example("veil contact list"))
    remove = contact_commands.add_parser(
        "remove", help="forget a contact", epilog=example("veil contact remove dana")
    )
    remove.add_argument("name")
    for sub, handler in ((add, contact_add), (listing, contact_list), (remove, contact_remove)):
        data_dir_option(sub, "holds identities/contacts.json")
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        bind(sub, handler)


def contact_add(args: argparse.Namespace) -> int:
    account = add_contact(Path(args.data_dir), args.name, args.account, any_form=args.any_form)
    document = {"name": args.name, "account": account}
    return report(args, document, lambda: print(f"contact {args.name!r} is account {account}"))


def contact_list(args: argparse.Namespace) -> int:
    rows = sorted(load_contacts(Path(args.data_dir)).items())
    document = {"contacts": [{"name": n, "account": a} for n, a in rows]}
    return report(args, document, lambda: output.table(["NAME", "ACCOUNT"], rows))


def contact_remove(args: argparse.Namespace) -> int:
    account = remove_contact(Path(args.data_dir), args.name)
    document = {"name": args.name, "account": account, "removed": True}
    return report(args, document, lambda: print(f"removed contact {args.name!r} ({account})"))
