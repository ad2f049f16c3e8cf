"""`make chaos`: minutes of kill -9 under load against a fresh local mesh; exit 1 if anything was lost.

    python -m tests.chaos.run --minutes 3 [--postgres] [--interval 8] [--json]

Prints acknowledged commands, lost ones (must be 0), and per fault the time from the kill to
SERVING again and the longest pause in acknowledgements. See tests/chaos/harness.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.chaos.harness import ChaosOptions, run_chaos


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="minutes of load and faults")
    parser.add_argument("--postgres", action="store_true", help="state and keyvault on PostgreSQL")
    parser.add_argument("--interval", type=float, default=8.0, help="seconds of load between faults")
    parser.add_argument("--holders", type=int, default=8, help="token accounts, one client each")
    parser.add_argument("--voters", type=int, default=4, help="voter client threads")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON object")
    parser.add_argument("--workdir", type=Path, help="keep the data dir and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = ChaosOptions(
        seconds=args.minutes * 60,
        postgres=args.postgres,
        interval=args.interval,
        holders=args.holders,
        voter_threads=args.voters,
    )
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(args.workdir, options)
    else:
        with tempfile.TemporaryDirectory(prefix="veil-chaos-") as workdir:
            report = run_chaos(Path(workdir), options)
    print(report.summary())
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
