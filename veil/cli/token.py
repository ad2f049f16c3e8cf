"""`veil token`: confidential balances: mint, transfer (one or a CSV), balance, supply."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.cli import output
from veil.cli.common import (
    account,
    acting_identity,
    bind_sdk,
    open_client,
    receipt_json,
    receipt_line,
    report,
)
from veil.sdk.errors import CommandRefused, VeilClientError

if TYPE_CHECKING:
    from veil.cli.common import Subcommands


def register(commands: Subcommands) -> None:
    token = commands.add_parser("token", help="confidential balances").add_subparsers(
        dest="token_command", required=True
    )
    mint = token.add_parser("mint", help="create tokens (issuer identity)")
    mint.add_argument("instance")
    mint.add_argument("to", help="identity name or account")
    mint.add_argument("amount", type=int)
    bind_sdk(mint, token_mint, identity=True)
    transfer = token.add_parser("transfer", help="send tokens (one, or many from a CSV of to,amount)")
    transfer.add_argument("instance")
    transfer.add_argument("to", nargs="?", help="identity name or account")
    transfer.add_argument("amount", nargs="?", type=int)
    transfer.add_argument("--from-csv", help="CSV file with rows to,amount; shows a progress bar")
    bind_sdk(transfer, token_transfer, identity=True)
    for verb, handler, text in (
        ("balance", token_balance, "your balance"),
        ("supply", token_supply, "the total supply"),
    ):
        read = token.add_parser(verb, help=text)
        read.add_argument("instance")
        bind_sdk(read, handler, identity=True)


def token_mint(args: argparse.Namespace) -> int:
    to = account(args, args.to)
    with open_client(args) as veil:
        token = veil.token(args.instance, acting_identity(args))
        supply = token.mint(to, args.amount)
    document = {"to": to, "amount": args.amount, "total_supply": supply, "receipt": receipt_json(token.last)}
    return report(
        args,
        document,
        lambda: print(f"minted {args.amount} to {to}; total supply {supply}; {receipt_line(token.last)}"),
    )


def _read_transfers(args: argparse.Namespace, path: Path) -> list[tuple[str, int]]:
    transfers: list[tuple[str, int]] = []
    with path.open(newline="") as file:
        for number, row in enumerate(csv.reader(file), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise VeilClientError(f"{path}:{number}: expected two columns: to,amount")
            to, amount = row[0].strip(), row[1].strip()
            if number == 1 and not amount.isdigit():
                continue  # a header line
            if not amount.isdigit() or int(amount) <= 0:
                raise VeilClientError(f"{path}:{number}: amount must be a positive integer")
            transfers.append((account(args, to), int(amount)))
    return transfers


def token_transfer(args: argparse.Namespace) -> int:
    if args.from_csv is not None:
        return _bulk_transfer(args)
    if args.to is None or args.amount is None:
        raise VeilClientError("give TO AMOUNT, or --from-csv FILE")
    to = account(args, args.to)
    with open_client(args) as veil:
        token = veil.token(args.instance, acting_identity(args))
        balance = token.transfer(to, args.amount)
    document = {"to": to, "amount": args.amount, "balance": balance, "receipt": receipt_json(token.last)}
    return report(
        args,
        document,
        lambda: print(f"sent {args.amount} to {to}; balance {balance}; {receipt_line(token.last)}"),
    )


def _bulk_transfer(args: argparse.Namespace) -> int:
    transfers = _read_transfers(args, Path(args.from_csv))
    results: list[dict[str, Any]] = []
    failed = 0
    with open_client(args) as veil:
        token = veil.token(args.instance, acting_identity(args))
        progress = output.Progress(len(transfers), "transfers")
        for to, amount in transfers:
            try:
                balance = token.transfer(to, amount)
                receipt = receipt_json(token.last)
                results.append(
                    {
                        "to": to,
                        "amount": amount,
                        "balance": balance,
                        "sequence": receipt and receipt["sequence"],
                    }
                )
            except CommandRefused as refusal:
                failed += 1
                results.append({"to": to, "amount": amount, "error": str(refusal)})
            progress.advance()
        progress.finish()
    sent = sum(r["amount"] for r in results if "error" not in r)
    document = {"transfers": results, "sent": sent, "failed": failed}

    def human() -> None:
        print(f"{len(results) - failed} transfers committed ({sent} tokens), {failed} refused")
        for r in results:
            if "error" in r:
                print(f"  refused: {r['amount']} to {r['to']}: {r['error']}")

    report(args, document, human)
    return 1 if failed else 0


def token_balance(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        token = veil.token(args.instance, acting_identity(args))
        balance = token.balance()
    document = {"account": token.account, "balance": balance, "receipt": receipt_json(token.last)}
    return report(args, document, lambda: print(f"{balance}  ({receipt_line(token.last)})"))


def token_supply(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        token = veil.token(args.instance, acting_identity(args))
        supply = token.total_supply()
    document = {"total_supply": supply, "receipt": receipt_json(token.last)}
    return report(args, document, lambda: print(f"{supply}  ({receipt_line(token.last)})"))
