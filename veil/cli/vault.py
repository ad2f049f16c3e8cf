"""`veil vault`: personal-data records, encrypted to the enclave, shared per reader."""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli.common import (
    acting_identity,
    bind_sdk,
    example,
    instance_id,
    namer,
    open_client,
    receipt_json,
    receipt_line,
    recipient,
    report,
)

if TYPE_CHECKING:
    from veil.cli.common import Subcommands


def register(commands: Subcommands) -> None:
    vault = commands.add_parser("vault", help="personal-data records").add_subparsers(
        dest="vault_command", required=True
    )
    put = vault.add_parser(
        "put",
        help="create or replace one of your records",
        epilog=example("veil vault put records passport --data P1234567 --as alice"),
    )
    put.add_argument("instance", type=instance_id)
    put.add_argument("record")
    source = put.add_mutually_exclusive_group()
    source.add_argument("--data", help="the content as text (default: stdin)")
    source.add_argument("--file", help="read the content from a file")
    bind_sdk(put, vault_put, identity=True)
    get = vault.add_parser(
        "get",
        help="read a record you own or that was shared with you",
        epilog=example("veil vault get records passport --owner alice --as bob"),
    )
    get.add_argument("instance", type=instance_id)
    get.add_argument("record")
    get.add_argument("--owner", help="the owner's identity or contact name, or account (default: you)")
    get.add_argument("--out", help="write the content to a file")
    bind_sdk(get, vault_get, identity=True)
    for verb, handler in (("share", vault_share), ("revoke", vault_revoke)):
        change = vault.add_parser(
            verb,
            help=f"{verb} read access to one of your records",
            epilog=example(f"veil vault {verb} records passport bob --as alice"),
        )
        change.add_argument("instance", type=instance_id)
        change.add_argument("record")
        change.add_argument("reader", help="identity or contact name, or a 64-hex account")
        bind_sdk(change, handler, identity=True)
    delete = vault.add_parser(
        "delete",
        help="erase one of your records",
        epilog=example("veil vault delete records passport --as alice"),
    )
    delete.add_argument("instance", type=instance_id)
    delete.add_argument("record")
    bind_sdk(delete, vault_delete, identity=True)


def vault_put(args: argparse.Namespace) -> int:
    if args.file is not None:
        data = Path(args.file).read_bytes()
    elif args.data is not None:
        data = args.data.encode("utf-8")
    else:
        data = sys.stdin.buffer.read()
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        vault = veil.vault(args.instance, identity)
        created = vault.put(args.record, data)
    document = {
        "record_id": args.record,
        "created": created,
        "bytes": len(data),
        "receipt": receipt_json(vault.last),
    }
    verb = "created" if created else "replaced"
    return report(
        args,
        document,
        lambda: print(f"{verb} record {args.record!r} ({len(data)} bytes); {receipt_line(vault.last)}"),
    )


def vault_get(args: argparse.Namespace) -> int:
    owner = recipient(args, args.owner) if args.owner else None
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        vault = veil.vault(args.instance, identity)
        record = vault.get(args.record, owner)
    if args.out:
        Path(args.out).write_bytes(record.data)
    document = {
        "record_id": args.record,
        "data_base64": base64.b64encode(record.data).decode("ascii"),
        "readers": list(record.readers),
        "receipt": receipt_json(vault.last),
    }

    def human() -> None:
        if not args.out:
            sys.stdout.buffer.write(record.data)
            if not record.data.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
        if record.readers:
            name = namer(args)
            print(f"shared with: {', '.join(name(r) for r in record.readers)}", file=sys.stderr)

    return report(args, document, human)


def _vault_change(args: argparse.Namespace, verb: str) -> int:
    reader = recipient(args, args.reader) if verb != "delete" else ""  # refused before connecting
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        vault = veil.vault(args.instance, identity)
        if verb == "delete":
            vault.delete(args.record)
            done = f"deleted record {args.record!r}"
        else:
            getattr(vault, verb)(args.record, reader)
            who = namer(args)(reader)
            done = f"{verb}d record {args.record!r} {'with' if verb == 'share' else 'from'} {who}"
    document = {"record_id": args.record, "action": verb, "receipt": receipt_json(vault.last)}
    if reader:
        document["reader"] = reader
    return report(args, document, lambda: print(f"{done}; {receipt_line(vault.last)}"))


def vault_share(args: argparse.Namespace) -> int:
    return _vault_change(args, "share")


def vault_revoke(args: argparse.Namespace) -> int:
    return _vault_change(args, "revoke")


def vault_delete(args: argparse.Namespace) -> int:
    return _vault_change(args, "delete")
