"""Fuzz run: loop random mutations over Veil's decoders for N seconds and report counts.

    python -m tests.attack.fuzz --seconds 300                  # all targets, time shared
    python -m tests.attack.fuzz --seconds 60 --target command  # one target
    python -m tests.attack.fuzz --seconds 60 --seed 7 --json   # reproducible, machine-readable

Targets (the same inputs and verdicts as the tests in this directory, see targets.py/rpc.py):

* ``quote``   the DCAP quote parser and verifier (real Intel quotes and a sim quote)
* ``ecall``   the enclave's ECALL dispatcher, in process
* ``command`` the sealed-command decoder through ExecuteBatch (a bad command between two good)
* ``rpc``     every keyvault and state RPC over real mTLS (servers started here, port 0)

No atheris, no coverage guidance: random and mutated inputs, each judged. Every iteration gets
its own seed, printed with any failure and written with the input under ``--crash-dir``, so
`--replay TARGET:SEED` reruns exactly that case. Exit status: 0 when nothing broke a rule, 1
otherwise. `make fuzz` runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.attack.enclave_world import INSTANCES, World, build_world, sim_quotes
from tests.attack.mesh import SERVICE_TARGETS, Lab
from tests.attack.rpc import check_rpc, rpc_input
from tests.attack.targets import (
    QuoteCase,
    bad_command,
    check_batch,
    check_ecall,
    check_quote,
    ecall_input,
    quote_corpus,
    quote_input,
)
from veil.dev.pki import init_pki

TARGETS = ("quote", "ecall", "command", "rpc")
SLICE_S = 1.0  # targets take turns in slices this long, so every one runs in a short run


@dataclass
class Stats:
    """What one target did."""

    runs: int = 0
    failures: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    first_failures: list[str] = field(default_factory=list)


class Fuzzer:
    """The targets' state (PKI, quote corpus, enclave world, servers) and one step per target."""

    def __init__(self, directory: Path, targets: Sequence[str], crash_dir: Path | None) -> None:
        self.pki_dir = directory / "pki"
        init_pki(self.pki_dir, now=dt.datetime.now(dt.UTC))
        self.crash_dir = crash_dir
        self.corpus: list[QuoteCase] = quote_corpus(self.pki_dir, sim_quotes(self.pki_dir).quote(bytes(64)))
        self.world: World = build_world(self.pki_dir)
        self.lab: Lab | None = Lab(self.pki_dir, directory / "lab") if "rpc" in targets else None
        self.steps: dict[str, Callable[[random.Random], tuple[str, bytes]]] = {
            "quote": self.quote,
            "ecall": self.ecall,
            "command": self.command,
            "rpc": self.rpc,
        }

    def close(self) -> None:
        if self.lab is not None:
            self.lab.close()

    def quote(self, rng: random.Random) -> tuple[str, bytes]:
        parent, data = quote_input(rng, self.corpus)
        return check_quote(parent, data), data

    def ecall(self, rng: random.Random) -> tuple[str, bytes]:
        frame = ecall_input(rng, self.world)
        label, changed = check_ecall(self.world, frame)
        if changed:
            self.world = build_world(self.pki_dir)
        return label, frame

    def command(self, rng: random.Random) -> tuple[str, bytes]:
        instance_id = rng.choice(INSTANCES)
        bad = bad_command(rng, self.world, instance_id)
        label, accepted = check_batch(rng, self.world, instance_id, bad)
        if accepted:
            self.world = build_world(self.pki_dir)
        return f"{instance_id}/{label}", bad.sealed.SerializeToString()

    def rpc(self, rng: random.Random) -> tuple[str, bytes]:
        assert self.lab is not None
        target = rng.choice(SERVICE_TARGETS)
        running = self.lab.get(target)
        method = rng.choice(target.methods)
        payload = rpc_input(rng, running, method)
        return f"{target.name}.{check_rpc(running, method, payload)}", payload

    def run_one(self, target: str, seed: int, stats: Stats) -> bool:
        """One iteration; a failure is counted, reported and saved, never raised."""
        stats.runs += 1
        try:
            label, _ = self.steps[target](random.Random(seed))
        except Exception as failure:
            stats.failures += 1
            self._report_failure(target, seed, failure, stats)
            if target in ("ecall", "command"):
                self.world = build_world(self.pki_dir)  # whatever it left behind is suspect
            return False
        stats.labels[label] += 1
        return True

    def _report_failure(self, target: str, seed: int, failure: Exception, stats: Stats) -> None:
        summary = f"{target}:{seed}: {type(failure).__name__}: {failure}"
        if len(stats.first_failures) < 5:
            stats.first_failures.append(summary)
        print(f"FAILURE {summary}", file=sys.stderr)
        traceback.print_exception(failure, limit=-4, file=sys.stderr)
        if self.crash_dir is not None:
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            _, data = self._input_of(target, seed)
            (self.crash_dir / f"{target}-{seed}.bin").write_bytes(data)
            (self.crash_dir / f"{target}-{seed}.txt").write_text(
                f"{summary}\nreplay: python -m tests.attack.fuzz --replay {target}:{seed}\n"
            )

    def _input_of(self, target: str, seed: int) -> tuple[str, bytes]:
        """Regenerate a failing input from its seed (the generators are deterministic)."""
        rng = random.Random(seed)
        if target == "quote":
            return "", quote_input(rng, self.corpus)[1]
        if target == "ecall":
            return "", ecall_input(rng, self.world)
        if target == "command":
            return "", bad_command(rng, self.world, rng.choice(INSTANCES)).sealed.SerializeToString()
        assert self.lab is not None
        service = rng.choice(SERVICE_TARGETS)
        return "", rpc_input(rng, self.lab.get(service), rng.choice(service.methods))


def run(seconds: float, targets: Sequence[str], seed: int, crash_dir: Path | None) -> dict[str, Stats]:
    """Fuzz `targets` in turns for `seconds` in total; returns each target's stats."""
    stats = {target: Stats() for target in targets}
    master = random.Random(seed)
    with _fuzzer(targets, crash_dir) as fuzzer:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for target in targets:
                slice_end = min(deadline, time.monotonic() + SLICE_S)
                while time.monotonic() < slice_end:
                    fuzzer.run_one(target, master.getrandbits(63), stats[target])
    return stats


@contextmanager
def _fuzzer(targets: Sequence[str], crash_dir: Path | None) -> Iterator[Fuzzer]:
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veil-fuzz-")))
        fuzzer = Fuzzer(directory, targets, crash_dir)
        stack.callback(fuzzer.close)
        yield fuzzer


def replay(spec: str) -> int:
    """Rerun one iteration (`TARGET:SEED`) with its traceback; 0 if it now passes."""
    target, _, seed = spec.partition(":")
    stats = Stats()
    with _fuzzer([target], None) as fuzzer:
        passed = fuzzer.run_one(target, int(seed), stats)
    print(f"{spec}: {'passed' if passed else 'FAILED'} ({dict(stats.labels) or stats.first_failures})")
    return 0 if passed else 1


def _print_table(stats: dict[str, Stats], seconds: float, seed: int) -> None:
    print(f"veil fuzz: {seconds:.0f}s, seed {seed}")
    print(f"{'target':<8} {'runs':>8} {'runs/s':>8} {'failures':>9}  top outcomes")
    for target, s in stats.items():
        top = ", ".join(f"{label} {count}" for label, count in s.labels.most_common(6))
        share = seconds / max(1, len(stats))
        print(f"{target:<8} {s.runs:>8} {s.runs / share:>8.0f} {s.failures:>9}  {top}")
    for s in stats.values():
        for failure in s.first_failures:
            print(f"  FAILED {failure}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.attack.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total run time (default 60)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable; default: all")
    parser.add_argument("--seed", type=int, default=None, help="master seed (default: random, printed)")
    parser.add_argument("--crash-dir", type=Path, default=None, help="write failing inputs here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--replay", metavar="TARGET:SEED", help="rerun one failing iteration")
    args = parser.parse_args(argv)
    # As in the tests (pytest's filterwarnings = error): a warning escaping a decoder is a finding.
    warnings.simplefilter("error")
    if args.replay:
        return replay(args.replay)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    targets = args.target or list(TARGETS)
    stats = run(args.seconds, targets, seed, args.crash_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "seconds": args.seconds,
                    "seed": seed,
                    "targets": {
                        t: {"runs": s.runs, "failures": s.failures, "outcomes": dict(s.labels)}
                        for t, s in stats.items()
                    },
                }
            )
        )
    else:
        _print_table(stats, args.seconds, seed)
    return 1 if any(s.failures for s in stats.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
