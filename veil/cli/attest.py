"""`veil attest`: verify a quote file offline (`verify`), or the enclave behind a gateway (`show`).

    veil attest verify QUOTE [--collateral JSON] [--now ISO8601] [--root intel|dev|PEM]
                             [--data-dir DIR]

prints one JSON object on stdout and exits 0 for a valid quote; exits 1 with
``error: <reason>`` on stderr for an invalid one, and 2 for a usage or I/O problem (its own
parser, so that these exit codes hold). Also runnable as ``python -m veil.cli.attest verify ...``.

    veil attest show [--instance ID] [connection options]

verifies the attestation bundle of the enclave behind the gateway (through the SDK) and
explains every check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from veil.cli import output
from veil.cli.common import VeilParser, bind_sdk, data_dir_option, example, open_client, report
from veil.verify.bundle import VerifiedAttestation
from veil.verify.collateral import Collateral
from veil.verify.errors import QuoteError
from veil.verify.roots import RootError, dev_root_path, resolve_root
from veil.verify.verifier import verify_quote

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """Bad arguments or unreadable inputs: not a verdict about the quote."""


def _parse_now(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _UsageError(f"--now {text!r} is not an ISO 8601 date/time") from None
    # A bare date/time on the command line means UTC, not the machine's zone.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def build_parser(prog: str = "veil attest verify") -> argparse.ArgumentParser:
    """Arguments of the verify command (everything after ``verify``)."""
    parser = VeilParser(prog=prog, description="Verify an Intel SGX DCAP quote v3 and print its identity.")
    parser.add_argument("quote", type=Path, help="raw quote file")
    parser.add_argument("--collateral", type=Path, help="collateral JSON (dcap-qvl format)")
    parser.add_argument("--now", help="verification time, ISO 8601 (default: now; naive = UTC)")
    parser.add_argument("--root", default="intel", help="trusted root: intel (default), dev, or a PEM file")
    data_dir_option(parser, "holds the dev PKI")
    return parser


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def verify_main(argv: list[str]) -> int:
    """Run ``veil attest verify`` with ``argv`` = the arguments after ``verify``."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has already printed usage or help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        now = _parse_now(args.now) if args.now is not None else None
        root = resolve_root(args.root, dev_root_path(args.data_dir))
        quote_bytes = _read(args.quote, "quote")
        collateral_bytes = _read(args.collateral, "collateral") if args.collateral is not None else None
    except (_UsageError, RootError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        collateral = Collateral.from_json(collateral_bytes) if collateral_bytes is not None else None
        result = verify_quote(quote_bytes, root_public_key=root, collateral=collateral, now=now)
    except QuoteError as exc:
        hint = ""
        if args.root == "intel" and dev_root_path(args.data_dir).exists():
            hint = " (a quote from the local sim mesh chains to the dev root: add --root dev)"
        print(f"error: {exc.reason}{hint}", file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, KeyError) as exc:  # collateral that is not what it claims to be
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result.to_json_dict()))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m veil.cli.attest verify ...``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "verify":
        print("usage: python -m veil.cli.attest verify QUOTE [options]", file=sys.stderr)
        return EXIT_USAGE
    return verify_main(args[1:])


# --- show ---------------------------------------------------------------------------------


def _when(seconds: int) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    left = seconds - dt.datetime.now(dt.UTC).timestamp()
    return f"{moment.isoformat(timespec='seconds')} (in {int(left // 60)} min {int(left % 60)} s)"


def attest_show(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        attestation: VerifiedAttestation = veil.attest(args.instance or "")
    document = {"gateway": args.gateway, "instance": args.instance, "verified": True, **attestation.to_json()}

    def human() -> None:
        print(
            f"enclave behind {args.gateway}"
            + (f" hosting {args.instance!r}" if args.instance else "")
            + ": TRUSTED"
        )
        output.fields(
            {
                "MRENCLAVE": attestation.mrenclave.hex(),
                "MRSIGNER": attestation.mrsigner.hex(),
                "product / SVN": f"{attestation.product_id} / {attestation.svn}",
                "debuggable": "yes" if attestation.debug else "no",
                "TCB status": attestation.tcb_status
                + (
                    f" (advisories: {', '.join(attestation.advisory_ids)})"
                    if attestation.advisory_ids
                    else ""
                ),
                "token issuer": attestation.issuer,
                "token expires": _when(attestation.token_expires_at),
                "HPKE key": attestation.keys.hpke_x25519_public_key.hex(),
                "receipt key": attestation.keys.signing_public_key.hex(),
            }
        )
        print("checked:")
        for check in attestation.checks:
            print(f"  ✓ {check}")

    return report(args, document, human)


def register(commands: Subcommands) -> None:
    attest = commands.add_parser("attest", help="attestation tools")
    attest_commands = attest.add_subparsers(dest="attest_command", required=True)
    # `veil attest verify` runs its own parser (veil.cli.main hands it the rest of the line);
    # this entry only lists it in the help.
    attest_commands.add_parser(
        "verify",
        help="verify a DCAP quote v3",
        add_help=False,
        epilog=example("veil attest verify quote.bin --root dev   # a quote from the local sim mesh"),
    )
    show = attest_commands.add_parser(
        "show",
        help="verify the enclave behind the gateway and explain it",
        epilog=example("veil attest show --instance coins"),
    )
    show.add_argument(
        "--instance", default="", help="the instance whose enclave to show (default shard if empty)"
    )
    bind_sdk(show, attest_show)


if __name__ == "__main__":
    sys.exit(main())
