"""`veil vault`: personal-data records, encrypted to the enclave, shared per reader."""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli.common import (
    acting_client,
    app_commands,
    app_verb,
    namer,
    receipt_json,
    recipient,
    report,
    report_receipt,
    request_id_option,
)

if TYPE_CHECKING:
    from veil.cli.common import Subcommands


def register(commands: Subcommands) -> None:
    vault = app_commands(commands, "vault", "personal-data records")
    with app_verb(
        vault,
        "put",
        vault_put,
        "create or replace one of your records",
        "veil vault put records passport --data P1234567 --as alice",
    ) as put:
        put.add_argument("record")
        source = put.add_mutually_exclusive_group()
        source.add_argument("--data", help="the content as text (default: stdin)")
        source.add_argument("--file", help="read the content from a file")
        request_id_option(put)
    with app_verb(
        vault,
        "get",
        vault_get,
        "read a record you own or that was shared with you",
        "veil vault get records passport --owner alice --as bob",
    ) as get:
        get.add_argument("record")
        get.add_argument("--owner", help="the owner's identity or contact name, or account (default: you)")
        get.add_argument("--out", help="write the content to a file")
    for verb, handler in (("share", vault_share), ("revoke", vault_revoke)):
        with app_verb(
            vault,
            verb,
            handler,
            f"{verb} read access to one of your records",
            f"veil vault {verb} records passport bob --as alice",
        ) as change:
            change.add_argument("record")
            change.add_argument("reader", help="identity or contact name, or a 64-hex account")
            request_id_option(change)
    with app_verb(
        vault,
        "delete",
        vault_delete,
        "erase one of your records",
        "veil vault delete records passport --as alice",
    ) as delete:
        delete.add_argument("record")
        request_id_option(delete)


def vault_put(args: argparse.Namespace) -> int:
    if args.file is not None:
        data = Path(args.file).read_bytes()
    elif args.data is not None:
        data = args.data.encode("utf-8")
    else:
        data = sys.stdin.buffer.read()
    with acting_client(args) as (veil, identity):
        vault = veil.vault(args.instance, identity)
        created = vault.put(args.record, data, request_id=args.request_id)
    document = {"record_id": args.record, "created": created, "bytes": len(data)}
    verb = "created" if created else "replaced"
    return report_receipt(args, document, vault.last, f"{verb} record {args.record!r} ({len(data)} bytes)")


def vault_get(args: argparse.Namespace) -> int:
    owner = recipient(args, args.owner) if args.owner else None
    with acting_client(args) as (veil, identity):
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
    with acting_client(args) as (veil, identity):
        vault = veil.vault(args.instance, identity)
        if verb == "delete":
            vault.delete(args.record, request_id=args.request_id)
            done = f"deleted record {args.record!r}"
        else:
            getattr(vault, verb)(args.record, reader, request_id=args.request_id)
            who = namer(args)(reader)
            done = f"{verb}d record {args.record!r} {'with' if verb == 'share' else 'from'} {who}"
    document = {"record_id": args.record, "action": verb, **({"reader": reader} if reader else {})}
    return report_receipt(args, document, vault.last, done)


def vault_share(args: argparse.Namespace) -> int:
    return _vault_change(args, "share")


def vault_revoke(args: argparse.Namespace) -> int:
    return _vault_change(args, "revoke")


def vault_delete(args: argparse.Namespace) -> int:
    return _vault_change(args, "delete")
