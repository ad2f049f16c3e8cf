"""`veil status` (one table of the mesh) and `veil completion` (generated from the parser)."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from tests.cli.support import Veil
from veil.cli.completion import words_by_path
from veil.cli.main import build_parser, main
from veil.cli.status import _shard_detail
from veil.gateway.v1 import gateway_pb2


def _closed() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_status_shows_every_service_in_one_table(veil: Veil) -> None:
    veil.identities("treasury")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    keyvault = _closed()
    out = veil.ok("status", "--keyvault", keyvault)
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["SERVICE", "HEALTH", "ADDRESS", "MRENCLAVE", "TCB", "HEAD"]
    assert lines[2].startswith("gateway")
    assert "SERVING" in lines[2]
    state_rows = [line for line in lines if line.startswith("state")]
    assert len(state_rows) == len(veil.mesh.states)
    assert "Unevaluated" in state_rows[0]  # the in-process keyvault's verdict, from the verified token
    assert any(line.startswith("keyvault") and "UNREACHABLE" in line and keyvault in line for line in lines)
    document = veil.json("status", "--keyvault", keyvault)
    (coins,) = [r for r in document["services"] if r["service"] == "instance coins"]
    assert coins["head"] >= 1
    assert coins["head_lag"] is None  # the keyvault is unreachable: not known, not guessed
    (line,) = [row for row in lines if row.startswith("instance coins")]
    assert line.split()[-1] == "n/a"


def test_a_replicas_row_says_who_released_its_strict_answers() -> None:
    quiet = gateway_pb2.ShardStatus(commands=5, commits=2, ecalls=3)
    assert _shard_detail(quiet) == "5 commands, 2 commits, 3 ECALLs"  # nothing held: nothing said
    strict = gateway_pb2.ShardStatus(
        commands=50, commits=9, ecalls=11, holds_released_by_keyvault=8, holds_released_by_enclave=1
    )
    assert _shard_detail(strict) == (
        "50 commands, 9 commits, 11 ECALLs; strict answers released by the keyvault 8, by the enclave 1"
    )


def test_completion_covers_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    table = words_by_path(build_parser())
    for path, words in table.items():
        for word in words:
            assert word in out, (path, word)
    assert "token transfer" in table
    assert "--from-csv" in table["token transfer"]
    assert "contact" in table[""]
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    probe = "COMP_WORDS=(veil token transfer coins --from); COMP_CWORD=4; _veil_complete"
    script = f'{out}{probe}; echo "${{COMPREPLY[@]}}"\n'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10, check=True)
    assert done.stdout.strip() == "--from-csv"
    assert main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("autoload -U +X bashcompinit")


def test_every_command_has_a_help_example() -> None:
    from tests.cli.test_hostile_args import LEAVES

    missing = [leaf.name for leaf in LEAVES if "example:" not in (leaf.parser.epilog or "")]
    assert missing == [], f"commands without a --help example: {missing}"
