"""`veil token`: confidential balances: mint, transfer (one, or a resumable CSV), balance, supply."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.cli import output
from veil.cli.common import (
    MAX_AMOUNT,
    acting_identity,
    amount,
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
from veil.sdk.contacts import canonical_account
from veil.sdk.errors import CommandRefused, IntegrityError, VeilClientError
from veil.sdk.files import write_json

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

#: Where bulk transfers remember, per file, which rows were applied (DATA_DIR/bulk/...).
BULK_DIR = "bulk"


def register(commands: Subcommands) -> None:
    token = commands.add_parser("token", help="confidential balances").add_subparsers(
        dest="token_command", required=True
    )
    mint = token.add_parser(
        "mint",
        help="create tokens (issuer identity)",
        epilog=example("veil token mint coins alice 100 --as treasury"),
    )
    mint.add_argument("instance", type=instance_id)
    mint.add_argument("to", nargs="?", help="identity or contact name")
    mint.add_argument("amount", nargs="?", type=amount)
    mint.add_argument("--to-account", metavar="HEX", help="an explicit account (64 hex characters)")
    bind_sdk(mint, token_mint, identity=True)
    transfer = token.add_parser(
        "transfer",
        help="send tokens (one, or many from a CSV of to,amount)",
        epilog=example(
            "veil token transfer coins bob 25 --as alice",
            "veil token transfer coins 25 --to-account 3f…(64 hex) --as alice",
            "veil token transfer coins --from-csv payroll.csv --as alice   # rerun to resume",
        ),
    )
    transfer.add_argument("instance", type=instance_id)
    transfer.add_argument("to", nargs="?", help="identity or contact name")
    transfer.add_argument("amount", nargs="?", type=amount)
    transfer.add_argument("--to-account", metavar="HEX", help="an explicit account (64 hex characters)")
    transfer.add_argument(
        "--from-csv",
        help="CSV file with rows to,amount; shows a progress bar; running it again skips the rows "
        "already applied",
    )
    bind_sdk(transfer, token_transfer, identity=True)
    for verb, handler, text in (
        ("balance", token_balance, "your balance"),
        ("supply", token_supply, "the total supply"),
    ):
        read = token.add_parser(verb, help=text, epilog=example(f"veil token {verb} coins --as bob"))
        read.add_argument("instance", type=instance_id)
        bind_sdk(read, handler, identity=True)


def _single(args: argparse.Namespace) -> tuple[str, int]:
    """(account, amount) of a one-recipient command: `TO AMOUNT` or `AMOUNT --to-account HEX`."""
    if args.to_account is not None:
        if args.amount is None and args.to is not None:
            # `transfer coins 25 --to-account HEX`: the one positional is the amount.
            args.amount, args.to = amount(args.to), None
        if args.to is not None:
            raise VeilClientError("give a recipient name or --to-account, not both")
        to = canonical_account(args.to_account)
    elif args.to is None:
        raise VeilClientError("give TO AMOUNT (TO: an identity or contact name) or AMOUNT --to-account HEX")
    else:
        to = recipient(args, args.to)
    if args.amount is None:
        raise VeilClientError("give the AMOUNT")
    return to, args.amount


def token_mint(args: argparse.Namespace) -> int:
    to, count = _single(args)
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        token = veil.token(args.instance, identity)
        supply = token.mint(to, count)
    name = namer(args)(to)
    document = {"to": to, "amount": count, "total_supply": supply, "receipt": receipt_json(token.last)}
    return report(
        args,
        document,
        lambda: print(f"minted {count} to {name}; total supply {supply}; {receipt_line(token.last)}"),
    )


def token_transfer(args: argparse.Namespace) -> int:
    if args.from_csv is not None:
        if args.to is not None or args.amount is not None or args.to_account is not None:
            raise VeilClientError("--from-csv takes its recipients from the file: give no TO or AMOUNT")
        return _bulk_transfer(args)
    to, count = _single(args)
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        token = veil.token(args.instance, identity)
        balance = token.transfer(to, count)
    name = namer(args)(to)
    document = {"to": to, "amount": count, "balance": balance, "receipt": receipt_json(token.last)}
    return report(
        args,
        document,
        lambda: print(f"sent {count} to {name}; balance {balance}; {receipt_line(token.last)}"),
    )


# --- bulk transfers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One transfer of a CSV file: its line number, the recipient as written, the account."""

    number: int
    name: str
    to: str
    amount: int


def _read_transfers(args: argparse.Namespace, path: Path, content: bytes) -> list[Row]:
    """Every row, each recipient resolved, before anything is sent: one bad row stops the file."""
    rows: list[Row] = []
    try:
        text = content.decode("utf-8-sig")
        for number, cells in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if not cells or not "".join(cells).strip() or cells[0].lstrip().startswith("#"):
                continue
            if len(cells) != 2:
                raise VeilClientError(f"{path}:{number}: expected two columns: to,amount")
            to, value = cells[0].strip(), cells[1].strip()
            if number == 1 and not value.isdigit():
                continue  # a header line
            if not value.isdigit() or not 0 < int(value) <= MAX_AMOUNT:
                raise VeilClientError(
                    f"{path}:{number}: amount {value!r} is not a whole number from 1 to {MAX_AMOUNT}"
                )
            try:
                account = recipient(args, to)
            except VeilClientError as exc:
                raise VeilClientError(f"{path}:{number}: {exc}") from None
            rows.append(Row(number, to, account, int(value)))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise VeilClientError(f"{path}: not a UTF-8 CSV file ({exc})") from None
    if not rows:
        raise VeilClientError(f"{path}: no transfers in the file")
    return rows


class Journal:
    """What earlier runs of one file did, row by row (written after every row, atomically).

    Each row's request id is derived from the file's hash, the sender and the row number, so
    the mesh (which keeps every committed request id's answer) also knows a row that ran in a
    run that stopped before writing its journal: such a row is never sent twice either.
    """

    def __init__(self, path: Path, file_hash: str, sender: str) -> None:
        self.path = path
        self.prefix = f"csv-{file_hash[:16]}-{sender[:12]}"
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or not isinstance(document.get("rows"), dict):
                raise VeilClientError(f"{path} is not a bulk-transfer journal; move it away to start over")
            self.rows = document["rows"]

    def entry(self, row: Row) -> dict[str, Any]:
        return self.rows.get(str(row.number), {})

    def request_id(self, row: Row) -> str:
        attempt = int(self.entry(row).get("attempt", 0))
        # A refused row moved nothing; trying it again is a new command under a new id.
        return f"{self.prefix}-{row.number}" + (f"-{attempt}" if attempt else "")

    def record(self, row: Row, **fields: Any) -> None:
        self.rows[str(row.number)] = {**self.entry(row), **fields}
        write_json(self.path, {"rows": self.rows})


def _bulk_transfer(args: argparse.Namespace) -> int:
    path = Path(args.from_csv)
    content = path.read_bytes()
    rows = _read_transfers(args, path, content)
    file_hash = hashlib.sha256(content).hexdigest()
    name = namer(args)
    results: list[dict[str, Any]] = []
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        token = veil.token(args.instance, identity)
        journal = Journal(
            Path(args.data_dir) / BULK_DIR / f"{args.instance}.{file_hash[:16]}.{identity.account[:12]}.json",
            file_hash,
            identity.account,
        )
        progress = output.Progress(len(rows), "transfers")
        for row in rows:
            base = {"row": row.number, "to": row.to, "amount": row.amount}
            earlier = journal.entry(row).get("state")
            if earlier in ("applied", "answered-earlier"):
                results.append({**base, "status": "skipped", "reason": earlier})
                progress.advance()
                continue
            request_id = journal.request_id(row)
            try:
                balance = token.transfer(row.to, row.amount, request_id=request_id)
            except CommandRefused as refusal:
                journal.record(row, state="refused", attempt=int(journal.entry(row).get("attempt", 0)) + 1)
                results.append({**base, "status": "refused", "error": str(refusal)})
            except IntegrityError:
                # The mesh answered this row's request id before, to a sealing of an earlier run
                # that stopped before its journal: the row ran (or was refused) then. Not again.
                journal.record(row, state="answered-earlier")
                results.append({**base, "status": "skipped", "reason": "answered-earlier"})
            else:
                receipt = receipt_json(token.last)
                journal.record(row, state="applied", sequence=receipt and receipt["sequence"])
                results.append(
                    {
                        **base,
                        "status": "applied",
                        "balance": balance,
                        "sequence": receipt and receipt["sequence"],
                    }
                )
            progress.advance()
        progress.finish()
    applied = [r for r in results if r["status"] == "applied"]
    refused = [r for r in results if r["status"] == "refused"]
    skipped = [r for r in results if r["status"] == "skipped"]
    sent = sum(r["amount"] for r in applied)
    document = {
        "transfers": results,
        "sent": sent,
        "applied": len(applied),
        "refused": len(refused),
        "skipped": len(skipped),
        "journal": str(journal.path),
    }

    def human() -> None:
        tally = f"{len(refused)} refused, {len(skipped)} skipped"
        print(f"{len(applied)} transfers committed ({sent} tokens), {tally}")
        for r in skipped:
            why = (
                "applied by an earlier run"
                if r["reason"] == "applied"
                else "the mesh already answered this row in an earlier run, applied or refused: "
                "not sent again; check the balance"
            )
            print(f"  skipped row {r['row']}: {r['amount']} to {name(r['to'])} ({why})")
        for r in refused:
            print(f"  refused row {r['row']}: {r['amount']} to {name(r['to'])}: {r['error']}")
        if refused:
            print("fix the refused rows' cause and run the same command again: applied rows are skipped")

    report(args, document, human)
    return 1 if refused else 0


# --- reads ----------------------------------------------------------------------------------


def token_balance(args: argparse.Namespace) -> int:
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        token = veil.token(args.instance, identity)
        balance = token.balance()
    document = {"account": token.account, "balance": balance, "receipt": receipt_json(token.last)}
    return report(args, document, lambda: print(f"{balance}  {receipt_line(token.last)}"))


def token_supply(args: argparse.Namespace) -> int:
    identity = acting_identity(args)  # refused before connecting
    with open_client(args) as veil:
        token = veil.token(args.instance, identity)
        supply = token.total_supply()
    document = {"total_supply": supply, "receipt": receipt_json(token.last)}
    return report(args, document, lambda: print(f"{supply}  {receipt_line(token.last)}"))
