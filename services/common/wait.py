"""`python -m veil.services.common.wait`: block until a service's admin port reports SERVING.

The Kubernetes init containers run it so that each service starts only after the one it
depends on is ready (deploy order keyvault -> state -> gateway):

    python -m veil.services.common.wait --address keyvault:51052 --service keyvault --timeout 300

Exits 0 once SERVING, 1 after the timeout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from veil.services.common.channels import wait_until_serving

_log = logging.getLogger("veil.wait")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m veil.services.common.wait",
        description="Block until a service's admin port reports SERVING.",
    )
    parser.add_argument("--address", required=True, help="HOST:PORT of the admin (plaintext health) port")
    parser.add_argument("--service", required=True, help="name used in log lines")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _log.info("waiting up to %.0fs for %s at %s", args.timeout, args.service, args.address)
    try:
        wait_until_serving(args.address, label=args.service, timeout=args.timeout)
    except TimeoutError as exc:
        _log.error("%s (%s)", exc, args.service)
        return 1
    _log.info("%s at %s is SERVING", args.service, args.address)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
