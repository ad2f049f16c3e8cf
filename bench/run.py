"""`make bench`: `veil bench` at 1-256 clients and with client batches, strict and fast, on a fresh mesh.

The curve sends one transfer per call at 1, 4, 16, 64 and 256 clients; the batched rows (default
16 clients, 32 transfers per call) send each client's transfers as one ExecuteBatch.

    python -m bench.run [--clients 1,4,16,64,256] [--ack strict,fast] [--batched 16x32] [--seconds 10]
    python -m bench.run --reuse --gateway 127.0.0.1:50051 --data-dir .veil   # a running mesh

By default a fresh mesh is started with `veil up` in a temporary data dir (sim enclave,
SQLite), on a free port offset so it can run beside `make run`, exactly as `make run` starts it
(its dev rate limit fits a benchmark; every request still goes through the limiter). Each level
and acknowledgment mode is one `veil bench --json` process against it (which also runs the bare
two-hop relay, veil.dev.relay); the CPU use of every mesh process per window is measured from
/proc. Writes `results.json` (every run's JSON object, the command, the machine), `results.md`
(the table) and `bench.png` (throughput and p99 against clients: confidential, Ping baseline,
relay). A ratio over a window with errors is not shown. A benchmark reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.dev.supervisor import await_mesh_up, free_port_offset
from veil.services.common.config import DEFAULT_PORTS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"


@dataclass
class LocalMesh:
    """A `veil up` process and where it serves."""

    process: subprocess.Popen[str]
    data_dir: Path
    offset: int

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{DEFAULT_PORTS['gateway'][0] + self.offset}"

    def pids(self) -> dict[str, list[int]]:
        """The mesh's processes by service (the enclave runner is the state's child)."""
        found: dict[str, list[int]] = {}
        for pid in _children(self.process.pid):
            argv = _argv(pid)
            module = argv[-1] if len(argv) >= 3 and argv[-2] == "-m" else ""
            if module.startswith(SERVICE_MODULE):
                service = module.removeprefix(SERVICE_MODULE)
                found[service] = [pid]
                if service == "state":
                    found["enclave"] = _children(pid)
        return found


#: `veil up` starts each service as `python -m veil.services.<service>`.
SERVICE_MODULE = "veil.services."


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    with contextlib.suppress(OSError):
        return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]
    return []


def _argv(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    return []


def _veil() -> str:
    return str(Path(sys.executable).with_name("veil"))


@contextlib.contextmanager
def fresh_mesh(workdir: Path) -> Iterator[LocalMesh]:
    """`veil up` in `workdir`, on a free port offset, until the block ends."""
    data_dir = workdir / ".veil"
    offset = free_port_offset()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (workdir / "up.log").open("w")
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        [_veil(), "up", "--data-dir", str(data_dir), "--port-offset", str(offset)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        try:
            await_mesh_up(process, offset)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; see {workdir / 'up.log'}") from None
        yield LocalMesh(process, data_dir, offset)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def bench_once(
    gateway: str,
    data_dir: Path,
    clients: int,
    timing: tuple[float, float],
    pids: dict[str, list[int]],
    *,
    ack: str = "strict",
    batch: int = 1,
) -> tuple[dict[str, Any], list[str]]:
    """One `veil bench --json` run (`timing`: window and warm-up seconds; `batch`: transfers per
    call); its JSON object and the command line (without the pid options)."""
    seconds, warmup = timing
    argv = [
        _veil(),
        "bench",
        "--json",
        "--gateway",
        gateway,
        "--data-dir",
        str(data_dir),
        "--clients",
        str(clients),
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
        "--ack",
        ack,
        *(["--batch", str(batch)] if batch > 1 else []),
    ]
    cpu = [f"--cpu-pid={name}={','.join(map(str, p))}" for name, p in sorted(pids.items()) if p]
    print(f"bench.run: {clients} client(s), {ack}, {batch} per call", file=sys.stderr, flush=True)
    done = subprocess.run(  # noqa: S603 - our own CLI
        [*argv, *cpu], cwd=REPO, capture_output=True, text=True, check=False
    )
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"veil bench failed ({done.returncode}):\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report, argv


def markdown(runs: Sequence[dict[str, Any]], command: str, machine: dict[str, Any]) -> str:
    """The results table, with the command and the machine."""
    lines = [
        "# `veil bench` results",
        "",
        f"Command: `{command}` (one `veil bench --json --clients N [--batch B]` per row; see "
        "results.json). `per call` is B: the transfers each client sends in one call (1: `Execute`, "
        "more: one `ExecuteBatch`; its p50 and p99 are then a whole call's).",
        f"Machine: {machine.get('cpu_count')} CPU ({machine.get('cpu_model')}), "
        f"{machine.get('memory_gib')} GiB, {machine.get('platform')}, Python {machine.get('python')}; "
        "sim enclave, SQLite (WAL, synchronous=FULL).",
        "Commands are pre-sealed before each timed window (client-side cryptography is timed "
        "separately: `seal`, `open` columns) and every answer is opened and its receipt verified.",
        "",
        "| ack | clients | per call | confidential tx/s | baseline (Ping) /s | relay /s | ratio | "
        "ratio to relay | p50 ms | p99 ms | baseline p99 ms | relay p99 ms | ECALLs/command | "
        "commands/commit | seal ms | open ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        cells = [
            r["acknowledgment"],
            r["clients"],
            r.get("batch", 1),
            *(f"{r[k]:.0f}" for k in ("confidential_tps", "baseline_tps", "relay_tps")),
            *("n/a" if r[k] is None else f"{r[k]:.2f}" for k in ("ratio", "ratio_to_relay")),
            *(f"{r[k]:.1f}" for k in ("p50_ms", "p99_ms", "baseline_p99_ms", "relay_p99_ms")),
            *(r[k] for k in ("ecalls_per_command", "commands_per_commit")),
            *(r[k] for k in ("client_seal_ms", "client_open_ms")),
            errors,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "CPU (cores busy) per window, by process:", ""]
    names = sorted({n for r in runs for n in r["cpu_cores"]["confidential"]})
    header = " | ".join([*names, "total", "CPU ms per command or call"])
    lines.append(f"| ack | clients | per call | window | {header} |")
    lines.append("|---|---:|---:|---|" + "---:|" * (len(names) + 2))
    for r in runs:
        for window in ("confidential", "baseline", "relay"):
            cores = r["cpu_cores"][window]
            used = " | ".join(f"{cores.get(n, 0):.2f}" for n in names)
            per_call = r.get("cpu_ms_per_call", {}).get(window)
            lines.append(
                f"| {r['acknowledgment']} | {r['clients']} | {r.get('batch', 1)} | {window} | {used} "
                f"| {sum(cores.values()):.2f} | {'n/a' if per_call is None else f'{per_call:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput and p99 latency against clients, confidential (one transfer per call) vs baseline."""
    runs = [r for r in runs if r.get("batch", 1) == 1]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ack in sorted({r["acknowledgment"] for r in runs}):
        mode = [r for r in runs if r["acknowledgment"] == ack]
        clients = [r["clients"] for r in mode]
        throughput.plot(clients, [r["confidential_tps"] for r in mode], "o-", label=f"confidential ({ack})")
        latency.plot(clients, [r["p99_ms"] for r in mode], "o-", label=f"confidential p99 ({ack})")
    baseline = [r for r in runs if r["acknowledgment"] == runs[0]["acknowledgment"]]
    clients = [r["clients"] for r in baseline]
    throughput.plot(clients, [r["baseline_tps"] for r in baseline], "s--", label="baseline (Ping)")
    throughput.plot(clients, [r["relay_tps"] for r in baseline], "^:", label="bare two-hop relay")
    throughput.set_ylabel("requests per second")
    latency.plot(clients, [r["baseline_p99_ms"] for r in baseline], "s--", label="baseline p99")
    latency.plot(clients, [r["relay_p99_ms"] for r in baseline], "^:", label="relay p99")
    latency.set_ylabel("p99 latency (ms)")
    for axis in (throughput, latency):
        axis.set_xscale("log", base=2)
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.set_xlabel("concurrent clients")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16,64,256", help="comma-separated client counts")
    parser.add_argument("--ack", default="strict,fast", help="comma-separated acknowledgment modes")
    parser.add_argument(
        "--batched",
        default="16x32",
        help="comma-separated CLIENTSxPER_CALL rows after the curve, each client sending PER_CALL "
        "transfers per ExecuteBatch ('' for none)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="each timed window")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up before each level")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--reuse", action="store_true", help="bench the running mesh at --gateway")
    parser.add_argument("--gateway", default=f"127.0.0.1:{DEFAULT_PORTS['gateway'][0]}")
    parser.add_argument("--data-dir", type=Path, default=Path(".veil"))
    args = parser.parse_args(argv)
    levels = [(int(c), 1) for c in args.clients.split(",")]
    levels += [(int(c), int(b)) for c, b in (spec.split("x") for spec in args.batched.split(",") if spec)]
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    commands: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.reuse:
            gateway, data_dir, pids = args.gateway, args.data_dir, {}
            mesh_note = f"a running mesh at {gateway}"
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veil-bench-")))
            mesh = stack.enter_context(fresh_mesh(workdir))
            gateway, data_dir = mesh.gateway, mesh.data_dir
            mesh_note = "a fresh `veil up` (sim enclave, SQLite) in a temporary data dir"
        for ack, (level, batch) in ((a, c) for a in args.ack.split(",") for c in levels):
            if not args.reuse:
                pids = mesh.pids()  # again: a restarted service has a new pid
            timing = (args.seconds, args.warmup)
            report, bench_argv = bench_once(gateway, data_dir, level, timing, pids, ack=ack, batch=batch)
            runs.append(report)
            commands.append(shlex.join(["veil", *bench_argv[1:]]))
            print(json.dumps(report, sort_keys=True), flush=True)
    machine = runs[0]["machine"] if runs else {}
    command = "make bench" if not args.reuse else "python -m bench.run --reuse"
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        "started": started,
        "mesh": mesh_note,
        "machine": machine,
        "bench_commands": commands,
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    (args.out / "results.md").write_text(markdown(runs, command, machine))
    title = f"veil bench on {machine.get('cpu_count')} CPU: confidential vs Ping baseline vs bare relay"
    plot(runs, args.out / "bench.png", title)
    print(f"bench.run: wrote {args.out}/results.json, results.md, bench.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
