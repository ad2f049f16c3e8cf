"""Every `veil` subcommand, found by walking the argparse tree (a new command is covered without
editing this file), run with hostile arguments: unknown names, negative and huge numbers,
missing files, bad addresses, unknown options, a mesh that is down, a port that speaks no TLS.

Each must end with exactly one `error:` line on stderr, a non-zero exit, nothing on stdout, no
traceback, and nothing executed by the mesh. In process (`main(argv)`) for speed; a few as real
subprocesses, which also shows gRPC's C core keeps quiet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway.support import InProcessMesh, mesh_fixture, write_fake_mesh_policy
from veil.cli.main import build_parser, main

HUGE = "1" + "0" * 30
MISSING = "/nonexistent/veil-hostile/file"
SHORT_HEX = "ab" * 31

#: Good values for positionals and required options, so one hostile value is the only fault.
GOOD = {
    "instance": "coins",
    "to": "bob",
    "amount": "5",
    "record": "r1",
    "reader": "bob",
    "ballot": "b1",
    "option": "0",
    "name": "dana",
    "account": "cd" * 32,
    "question": "q?",
    "app": "token",
    "quote": MISSING,
}
#: Hostile values per argument (dest); every leaf also gets an unknown option.
HOSTILE: dict[str, list[str]] = {
    "gateway": ["127.0.0.1:99999", "127.0.0.1:0", ":50051", "nohost", "a b:1", "127.0.0.1:-1"],
    "timeout": ["-1", "0", "nan", "1e999", "x"],
    "max_request_bytes": ["-1", "0", "4194305", HUGE, "1.5", "x"],  # (1 to the transport's 4 MiB)
    "amount": ["-5", "0", HUGE, "1.5", "x"],
    "to": ["nobody", SHORT_HEX, "AB" * 33],
    "reader": ["nobody", SHORT_HEX],
    "owner": ["nobody", SHORT_HEX],
    "voter": ["nobody", "alcie"],
    "to_account": [SHORT_HEX, "zz" * 32, "nobody"],
    "token_issuer": ["nobody"],
    "identity": ["nobody", "../../etc/passwd", MISSING + ".key"],
    "instance": ["Coins", "bad id", "-x", "a" * 64],
    "min_votes": ["-1", HUGE],
    "clients": ["-1", "0", HUGE],
    "processes": ["-1", HUGE],
    "seconds": ["-1", "0"],
    "warmup": ["-1"],
    "port_offset": ["-49001", "10001", HUGE, "x"],  # (a negative shift down to -49000 is allowed)
    "policy": [MISSING],
    "ca": [MISSING],
    "cert": [MISSING],
    "jwks": [MISSING],
    "from_csv": [MISSING],
    "file": [MISSING],
    "receipt": [MISSING],
    "oauth2_jwks": [MISSING],
    "name": ["../x", "-", "a" * 65],
    "account": ["nobody", SHORT_HEX],
    "option": ["99", "nobody"],
    "genesis": ["zz"],
    "mrenclave": ["zz"],
    "root": ["bogus"],
    "cpu_pid": ["x=abc"],
    "keyvault": ["127.0.0.1:99999", "nohost"],
    "shell": ["fish", ""],
}
#: Options whose hostile value only bites together with another (they are judged with it).
NEEDS = {
    "root": ["--mrenclave", "ab" * 32],
    "jwks": ["--mrenclave", "ab" * 32],
    "cert": ["--key", MISSING],
    "oauth2_jwks": ["--auth", "oauth2", "--oauth2-issuer", "i", "--oauth2-audience", "a"],
}
#: Good arguments left out when an option is tested (it replaces them).
REPLACES = {"to_account": {"to"}, "from_csv": {"to", "amount"}}
#: Leaves never run with good arguments here: they would start servers or write a PKI.
NOT_WITH_GOOD_ARGS = {"up", "pki init"}


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def actions(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if not isinstance(a, argparse._HelpAction)]

    def has(self, dest: str) -> bool:
        return any(a.dest == dest for a in self.actions())


def leaves() -> list[Leaf]:
    """Every runnable command of the parser tree."""
    found: list[Leaf] = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            found.append(Leaf(path, parser))
            return
        for group in groups:
            for word, sub in group.choices.items():
                walk(sub, (*path, word))

    walk(build_parser(), ())
    return found


LEAVES = leaves()


def good_argv(leaf: Leaf, *, skip: str = "") -> list[str]:
    """The leaf with valid values everywhere it needs one (except `skip`)."""
    argv = list(leaf.path)
    for action in leaf.actions():
        if action.dest == skip or action.dest in REPLACES.get(skip, ()):
            continue
        if not action.option_strings:
            if action.nargs != "?" or action.dest in ("to", "amount"):
                argv.append(GOOD.get(action.dest, "x"))
        elif action.required:
            argv += [action.option_strings[0], GOOD.get(action.dest, "x")]
            if action.dest == "option":
                argv += [action.option_strings[0], "no"]
    return argv


def hostile_cases() -> Iterator[tuple[str, Leaf, list[str]]]:
    for leaf in LEAVES:
        if leaf.path == ("attest", "verify"):
            continue  # its own parser: test_attest_verify_hostile
        yield f"{leaf.name}: unknown option", leaf, [*good_argv(leaf), "--no-such-option"]
        for action in leaf.actions():
            for value in HOSTILE.get(action.dest, []):
                argv = good_argv(leaf, skip=action.dest)
                if action.option_strings:
                    argv += [action.option_strings[0], value, *NEEDS.get(action.dest, [])]
                else:
                    argv = _insert_positional(leaf, argv, action, value)
                yield f"{leaf.name}: {action.dest}={value[:20]}", leaf, argv


def _insert_positional(leaf: Leaf, argv: list[str], target: argparse.Action, value: str) -> list[str]:
    """`argv` with `value` in `target`'s place among the positionals."""
    out = list(leaf.path)
    rest = argv[len(leaf.path) :]
    for action in leaf.actions():
        if action.option_strings:
            continue
        if action is target:
            out.append(value)
        elif action.nargs != "?" or action.dest in ("to", "amount"):
            out.append(rest.pop(0))
    # A value starting with "-" is an option to argparse unless after "--".
    if value.startswith("-"):
        positional = out[len(leaf.path) :]
        out = [*leaf.path, *rest, "--", *positional]
        return out
    return out + rest


CASES = list(hostile_cases())


def assert_one_line_error(status: int, out: str, err: str, case: str) -> None:
    assert status != 0, f"{case}: exit 0\n{out}"
    assert "Traceback" not in err + out, f"{case}: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{case}: {len(lines)} lines on stderr: {err!r}"
    assert lines[0].startswith("error:"), f"{case}: {lines[0]!r}"
    assert out == "", f"{case}: printed {out!r}"


@pytest.fixture(scope="module")
def module_mesh(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def data_dir(module_mesh: InProcessMesh) -> Path:
    """The mesh's data dir with its policy and the identities the good arguments name."""
    data = module_mesh.data_dir
    write_fake_mesh_policy(data)
    for name in ("default", "alice", "bob"):
        assert main(["identity", "new", name, "--data-dir", str(data)]) == 0
    return data


@pytest.fixture(autouse=True)
def stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vault put` without --data reads stdin."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"content")))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_the_tree_is_covered() -> None:
    names = {leaf.name for leaf in LEAVES}
    assert {"token transfer", "ballot create", "vault share", "contact add", "attest show", "bench"} <= names
    for leaf in LEAVES:  # every leaf gets at least its unknown-option case, most many more
        assert any(case.startswith(f"{leaf.name}:") for case, _, _ in CASES) or leaf.name == "attest verify"
    assert len(LEAVES) >= 25
    assert len(CASES) >= 150


def test_every_command_with_hostile_arguments(
    module_mesh: InProcessMesh, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a live mesh: whatever gets through argparse is refused before it executes."""
    executed = module_mesh.states[0].calls["Execute"]
    created = module_mesh.states[0].calls["CreateInstance"]
    for case, leaf, argv in CASES:
        extra = ["--gateway", module_mesh.address] if leaf.has("gateway") and "--gateway" not in argv else []
        if argv[0] in ("up", "pki") and "--data-dir" not in argv:
            extra += ["--data-dir", str(data_dir / "scratch")]
        elif "--data-dir" not in argv:
            extra += ["--data-dir", str(data_dir)]
        status, out, err = run(_before_dashes(argv, extra), capsys)
        assert_one_line_error(status, out, err, case)
    assert module_mesh.states[0].calls["Execute"] == executed  # nothing ran
    assert module_mesh.states[0].calls["CreateInstance"] == created


def _before_dashes(argv: list[str], extra: list[str]) -> list[str]:
    if "--" in argv:
        at = argv.index("--")
        return [*argv[:at], *extra, *argv[at:]]
    return [*argv, *extra]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_every_mesh_command_with_the_mesh_down(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Good arguments, nobody listening: one line naming the address and `make run`, at once."""
    address = f"127.0.0.1:{_closed_port()}"
    checked = 0
    for leaf in LEAVES:
        if not leaf.has("gateway") or leaf.name in NOT_WITH_GOOD_ARGS:
            continue
        started = time.monotonic()
        status, out, err = run([*good_argv(leaf), "--gateway", address, "--data-dir", str(data_dir)], capsys)
        assert_one_line_error(status, out, err, leaf.name)
        if leaf.name != "ballot verify-receipt":  # it reads its local receipt first
            assert address in err, f"{leaf.name}: {err}"
            assert "make run" in err, f"{leaf.name}: {err}"
        assert time.monotonic() - started < 3, leaf.name
        checked += 1
    assert checked >= 20


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A port that accepts connections and never answers (an admin port, another service)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def _subprocess(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "VEIL_"))}
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=environment,
        check=False,
    )


def test_subprocess_a_port_without_tls_fails_fast_and_quietly(data_dir: Path, silent_port: str) -> None:
    started = time.monotonic()
    done = _subprocess(
        "token", "balance", "coins", "--gateway", silent_port, "--data-dir", str(data_dir), cwd=data_dir
    )
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "no TLS")
    assert silent_port in done.stderr
    assert "TLS" in done.stderr
    assert time.monotonic() - started < 10


def test_subprocess_mistyped_name_and_missing_csv(data_dir: Path, tmp_path: Path) -> None:
    done = _subprocess(
        "token",
        "transfer",
        "coins",
        "nobody",
        "1",
        "--as",
        "alice",
        "--data-dir",
        str(data_dir),
        cwd=tmp_path,
    )
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "nobody")
    assert "'nobody' is not a known identity or contact" in done.stderr
    done = _subprocess(
        "token", "transfer", "coins", "--from-csv", "absent.csv", "--data-dir", str(data_dir), cwd=tmp_path
    )
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "csv")
    assert "absent.csv" in done.stderr
    done = _subprocess("token", "transfer", "coins", "bob", "-5", "--data-dir", str(data_dir), cwd=tmp_path)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, "negative")


def test_attest_verify_hostile(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "quote.bin"
    garbage.write_bytes(b"\x00" * 10)
    for argv in (
        [MISSING],
        [str(garbage)],
        [str(garbage), "--now", "yesterday"],
        [str(garbage), "--root", "bogus"],
        [str(garbage), "--collateral", MISSING],
        ["--no-such-option"],
        [],
    ):
        status, out, err = run(["attest", "verify", *argv, "--data-dir", str(data_dir)], capsys)
        assert_one_line_error(status, out, err, f"attest verify {argv}")


def test_json_output_is_untouched_by_errors(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        ["contact", "add", "dana", "cd" * 32, "--json", "--data-dir", str(data_dir)], capsys
    )
    assert status == 0, err
    assert json.loads(out)["account"] == "cd" * 32


def test_incomplete_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """Every noun without its verb (and `veil` alone): one line, exit 2."""
    nouns = sorted({leaf.path[:-1] for leaf in LEAVES if len(leaf.path) > 1})
    for path in [(), *nouns]:
        status, out, err = run(list(path), capsys)
        assert status == 2, path
        assert_one_line_error(status, out, err, " ".join(path) or "veil")
    assert len(nouns) >= 8
