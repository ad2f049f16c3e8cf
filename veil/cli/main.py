"""The `veil` command: the parser, built from one module per noun, and the entry point.

    veil status | identity | contact | instance | vault | token | ballot | attest | completion
                                                                (the SDK's commands)
    veil pki | up | bench ...                                   (operator tooling, veil.dev)

Each noun module has `register(commands)`, binding every leaf command to a typed `Handler`
(`veil.cli.common`). The operator nouns are registered from `veil.dev.cli`, the one place the
CLI reaches into `veil.dev`; with only the SDK installed they explain that they need
`veil[server]`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from veil.cli import attest, ballot, completion, contact, identity, instance, status, token, vault
from veil.cli.common import ArgumentsRefused, VeilParser, handler_of, json_error, run

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

NOUNS = (status, identity, contact, instance, vault, token, ballot, attest, completion)


def register_dev_nouns(commands: Subcommands) -> None:
    """`veil pki`, `veil up`, `veil bench`: operator tooling from veil.dev."""
    from veil.dev.cli import register

    register(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = VeilParser(prog="veil", description="Veil: a confidential-computing gRPC mesh.")
    commands = parser.add_subparsers(dest="command", required=True)
    for noun in NOUNS:
        noun.register(commands)
    register_dev_nouns(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `veil` command; the exit status out (2: bad arguments, 1: the command failed)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if arguments[:2] == ["attest", "verify"]:
        return attest.verify_main(arguments[2:])
    try:
        args = build_parser().parse_args(arguments)
    except ArgumentsRefused as refused:  # one line about the arguments, printed
        if "--json" in arguments:
            json_error(refused.line, 2)
        return 2
    except SystemExit as exit_:  # argparse printed the help
        return exit_.code if isinstance(exit_.code, int) else 2
    return run(handler_of(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
