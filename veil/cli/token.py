"""`veil token`: confidential balances: mint, transfer (one, or a resumable CSV), balance, supply.

A CSV transfer sends its rows in chunks of BULK_CHUNK, one ExecuteBatch each
(`TokenClient.transfer_many`): a chunk's rows run in file order under the sender's consecutive
counters, each verified and settled exactly as a single transfer is."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.cli import output
from veil.cli.common import (
    MAX_AMOUNT,
    UsageError,
    acting_client,
    amount,
    app_commands,
    app_verb,
    namer,
    receipt_json,
    receipt_line,
    recipient,
    report,
    report_receipt,
    request_id_option,
)
from veil.sdk.apps import BatchResult
from veil.sdk.contacts import canonical_account
from veil.sdk.errors import (
    CommandRefused,
    CounterGap,
    GatewayError,
    IdentityError,
    IntegrityError,
    NotRunYet,
    NotSettledYet,
    OutcomeUnknown,
    ResultLost,
    VeilClientError,
)
from veil.sdk.files import write_json

if TYPE_CHECKING:
    from veil.cli.common import Subcommands
    from veil.sdk.apps import TokenClient

#: Where bulk transfers remember, per file, which rows were applied (DATA_DIR/bulk/...).
BULK_DIR = "bulk"
#: Rows per ExecuteBatch of a bulk transfer (the gateway takes up to 256 commands per call).
BULK_CHUNK = 128


def register(commands: Subcommands) -> None:
    token = app_commands(commands, "token", "confidential balances")
    with app_verb(
        token,
        "mint",
        token_mint,
        "create tokens (issuer identity)",
        "veil token mint coins alice 100 --as treasury",
    ) as mint:
        _recipient_arguments(mint)
    with app_verb(
        token,
        "transfer",
        token_transfer,
        "send tokens (one, or many from a CSV of to,amount)",
        "veil token transfer coins bob 25 --as alice",
        "veil token transfer coins 25 --to-account 3f…(64 hex) --as alice",
        "veil token transfer coins --from-csv payroll.csv --as alice   # rerun to resume",
    ) as transfer:
        _recipient_arguments(transfer)
        transfer.add_argument(
            "--from-csv",
            help="CSV file with rows to,amount; shows a progress bar; running it again skips the rows "
            "already applied",
        )
    for verb, handler, text in (
        ("balance", token_balance, "your balance"),
        ("supply", token_supply, "the total supply"),
    ):
        with app_verb(token, verb, handler, text, f"veil token {verb} coins --as bob"):
            pass  # INSTANCE is its only argument


def _recipient_arguments(parser: argparse.ArgumentParser) -> None:
    """`TO AMOUNT` or `AMOUNT --to-account HEX` (see `_single`), and the call's request id."""
    parser.add_argument("to", nargs="?", help="identity or contact name")
    parser.add_argument("amount", nargs="?", type=amount)
    parser.add_argument("--to-account", metavar="HEX", help="an explicit account (64 hex characters)")
    request_id_option(parser)


def _single(args: argparse.Namespace) -> tuple[str, int]:
    """(account, amount) of a one-recipient command: `TO AMOUNT` or `AMOUNT --to-account HEX`."""
    if args.to_account is not None:
        try:
            if args.amount is None and args.to is not None:
                # `transfer coins 25 --to-account HEX`: the one positional is the amount.
                args.amount, args.to = amount(args.to), None
            if args.to is not None:
                raise UsageError("give a recipient name or --to-account, not both")
            to = canonical_account(args.to_account)
        except (argparse.ArgumentTypeError, IdentityError) as exc:  # judged here, not by the parser
            raise UsageError(str(exc)) from None
    elif args.to is None:
        raise UsageError("give TO AMOUNT (TO: an identity or contact name) or AMOUNT --to-account HEX")
    else:
        to = recipient(args, args.to)
    if args.amount is None:
        raise UsageError("give the AMOUNT")
    return to, args.amount


def token_mint(args: argparse.Namespace) -> int:
    return _to_one(args, "mint")


def token_transfer(args: argparse.Namespace) -> int:
    if args.from_csv is not None:
        if args.to is not None or args.amount is not None or args.to_account is not None:
            raise UsageError("--from-csv takes its recipients from the file: give no TO or AMOUNT")
        return _bulk_transfer(args)
    return _to_one(args, "transfer")


def _to_one(args: argparse.Namespace, verb: str) -> int:
    """A mint (answers the total supply) or a transfer (the sender's balance) to one recipient."""
    to, count = _single(args)
    with acting_client(args) as (veil, identity):
        token = veil.token(args.instance, identity)
        resume = args.request_id
        after = (
            token.mint(to, count, request_id=resume)
            if verb == "mint"
            else token.transfer(to, count, request_id=resume)
        )
    name = namer(args)(to)
    if verb == "mint":
        key, done = "total_supply", f"minted {count} to {name}; total supply {after}"
    else:
        key, done = "balance", f"sent {count} to {name}; balance {after}"
    return report_receipt(args, {"to": to, "amount": count, key: after}, token.last, done)


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
            if number == 1 and (to.lower(), value.lower()) == ("to", "amount"):
                continue  # the header line (anything else on line 1 is a row, checked as one)
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
    """What earlier runs of one file did, row by row (written after every chunk of rows, atomically).

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

    def save(self) -> None:
        # Durable: the SDK forgets the rows' kept calls once this returns (a power loss must not
        # lose both).
        write_json(self.path, {"rows": self.rows}, durable=True)


def _bulk_transfer(args: argparse.Namespace) -> int:
    path = Path(args.from_csv)
    content = path.read_bytes()
    rows = _read_transfers(args, path, content)
    file_hash = hashlib.sha256(content).hexdigest()
    name = namer(args)
    results: list[dict[str, Any]] = []
    with acting_client(args) as (veil, identity):
        token = veil.token(args.instance, identity)
        journal = Journal(
            Path(args.data_dir) / BULK_DIR / f"{args.instance}.{file_hash[:16]}.{identity.account[:12]}.json",
            file_hash,
            identity.account,
        )
        progress = output.Progress(len(rows), "transfers")
        for start in range(0, len(rows), BULK_CHUNK):
            chunk_rows = rows[start : start + BULK_CHUNK]
            sent_as = [journal.request_id(row) for row in chunk_rows]  # a refusal moves a row's id on
            chunk = _bulk_chunk(token, journal, chunk_rows)
            journal.save()
            # Their outcomes are in the journal now: the SDK's kept calls of the settled rows
            # (named by their request ids, kept with their answers until here) can go.
            veil.forget(
                request_id
                for request_id, result in zip(sent_as, chunk, strict=True)
                if result["status"] in ("applied", "refused", "skipped")
            )
            results.extend(chunk)
            progress.advance(len(chunk))
            if any(result["status"] == "stopped" for result in chunk):
                break
        progress.finish()
    by_status = {s: [r for r in results if r["status"] == s] for s in _STATUSES}
    sent = sum(r["amount"] for r in by_status["applied"])
    document = {
        "transfers": results,
        "sent": sent,
        **{s: len(rows_) for s, rows_ in by_status.items()},
        "journal": str(journal.path),
    }

    def human() -> None:
        counts = by_status
        applied, refused, skipped = (len(counts[s]) for s in ("applied", "refused", "skipped"))
        print(
            f"{applied} transfers committed ({sent} tokens), {refused} refused, {skipped} skipped, "
            f"{len(counts['unknown'])} outcome unknown"
        )
        for r in results:
            if r["detail"]:
                print(f"  {r['status']} row {r['row']}: {r['amount']} to {name(r['to'])}: {r['detail']}")
        if counts["refused"] or counts["stopped"]:
            print(
                "fix the cause and run the same command again: applied rows are skipped, none is paid twice"
            )
        if counts["unknown"]:
            print("check the balance of the rows whose outcome is unknown: this file never sends them again")

    report(args, document, human)
    return 0 if len(by_status["applied"]) + len(by_status["skipped"]) == len(rows) else 1


_STATUSES = ("applied", "refused", "skipped", "unknown", "stopped")
#: Pauses before a row without an answer is sent again in the same run (then the run stops).
_RESUME_PAUSES_S = (1.0, 2.0)


_EARLIER = {
    "applied": "applied by an earlier run",
    "unknown": "its outcome was unknown in an earlier run; never sent again",
}
_NO_ANSWER = (
    "the mesh's answer did not authenticate (an earlier run's answer under this row's request id, "
    "or tampering): it may have run, so it is never sent again"
)


def _transfers_resuming(token: TokenClient, rows: list[Row], request_ids: list[str]) -> list[BatchResult]:
    """The rows' transfers in one batch; rows left without an answer go again (same request
    ids: the same calls, same sealed bytes first), so an attempt that ran is answered, not run
    twice."""
    results: dict[int, BatchResult] = {}
    todo = list(range(len(rows)))
    for pause in (*_RESUME_PAUSES_S, None):
        try:
            answers = token.transfer_many(
                [(rows[i].to, rows[i].amount) for i in todo], request_ids=[request_ids[i] for i in todo]
            )
        except GatewayError as failure:  # nothing was sent (e.g. the attestation failed)
            answers = [BatchResult(error=failure)] * len(todo)
        results.update(zip(todo, answers, strict=True))
        todo = [i for i in todo if isinstance(results[i].error, GatewayError)]
        if not todo or pause is None:
            break
        time.sleep(pause)
    return [results[i] for i in range(len(rows))]


def _bulk_chunk(token: TokenClient, journal: Journal, rows: list[Row]) -> list[dict[str, Any]]:
    """Send the rows no earlier run settled, in one batch; what happened to each (`detail` for
    people), in file order."""
    results: dict[int, dict[str, Any]] = {}
    todo: list[Row] = []
    for row in rows:
        earlier = journal.entry(row).get("state")
        result: dict[str, Any] = {"row": row.number, "to": row.to, "amount": row.amount, "detail": ""}
        results[row.number] = result
        if earlier in _EARLIER:  # settled by an earlier run: never sent again
            result.update(status="skipped" if earlier == "applied" else "unknown", detail=_EARLIER[earlier])
        else:
            todo.append(row)
    if todo:
        answers = _transfers_resuming(token, todo, [journal.request_id(row) for row in todo])
        for row, answer in zip(todo, answers, strict=True):
            _settle_row(journal, row, answer, results[row.number])
    return [results[row.number] for row in rows]


def _settle_row(journal: Journal, row: Row, answer: BatchResult, result: dict[str, Any]) -> None:
    """Record one sent row's outcome, as a single transfer's would be."""
    error = answer.error
    if error is None:
        receipt = receipt_json(answer.opened)
        result.update(status="applied", balance=answer.value, sequence=receipt and receipt["sequence"])
    elif isinstance(error, CommandRefused):
        # A refusal moved nothing: the next run tries again, under the next request id.
        journal.record(row, state="refused", attempt=int(journal.entry(row).get("attempt", 0)) + 1)
        result.update(status="refused", detail=str(error))
    elif isinstance(error, ResultLost):
        result.update(status="applied", sequence=error.sequence, detail=str(error))
    elif isinstance(error, CounterGap | NotRunYet | NotSettledYet):
        # Not run so far: it waits for earlier calls of this account that have no answer yet, the
        # enclave refused it for now (its budget, its clock), or its counter could not be used up
        # after an answer it cannot open. Its sealing is kept in the data dir's calls store and
        # may still run: the next run resumes it, same bytes.
        result.update(status="stopped", detail=f"stopped here: {error}")
    elif isinstance(error, IntegrityError | OutcomeUnknown):
        journal.record(row, state="unknown")
        result.update(
            status="unknown", detail=_NO_ANSWER if isinstance(error, IntegrityError) else str(error)
        )
    else:
        # No answer at all (the mesh went away): the row may have run. The next run sends it
        # under the same request id, which the mesh answers once, never twice.
        result.update(status="stopped", detail=f"stopped here: {error}")
    if result["status"] == "applied":
        journal.record(row, state="applied", sequence=result["sequence"])


# --- reads ----------------------------------------------------------------------------------


def token_balance(args: argparse.Namespace) -> int:
    return _read(args, "balance")


def token_supply(args: argparse.Namespace) -> int:
    return _read(args, "total_supply")


def _read(args: argparse.Namespace, key: str) -> int:
    with acting_client(args) as (veil, identity):
        token = veil.token(args.instance, identity)
        value = token.balance() if key == "balance" else token.total_supply()
    document: dict[str, Any] = {"account": token.account} if key == "balance" else {}
    document.update({key: value, "receipt": receipt_json(token.last)})
    return report(args, document, lambda: print(f"{value}  {receipt_line(token.last)}"))
