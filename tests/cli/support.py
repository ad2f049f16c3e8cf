"""Running `veil` in process against an in-process mesh, for the tests under tests/cli/."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.gateway.support import InProcessMesh, write_fake_mesh_policy
from veil.cli.main import main


class Veil:
    """Runs `veil ...` in process against one mesh, returning (status, stdout, stderr)."""

    def __init__(self, mesh: InProcessMesh, capsys: pytest.CaptureFixture[str]) -> None:
        self.mesh = mesh
        self.capsys = capsys
        write_fake_mesh_policy(mesh.data_dir)

    def __call__(self, *argv: str, connect: bool = True) -> tuple[int, str, str]:
        args = list(argv)
        if connect:
            args += ["--gateway", self.mesh.address]
        args += ["--data-dir", str(self.mesh.data_dir)]
        self.capsys.readouterr()
        status = main(args)
        out, err = self.capsys.readouterr()
        return status, out, err

    def ok(self, *argv: str, connect: bool = True) -> str:
        status, out, err = self(*argv, connect=connect)
        assert status == 0, err
        return out

    def json(self, *argv: str, connect: bool = True) -> Any:
        return json.loads(self.ok(*argv, "--json", connect=connect))

    def identities(self, *names: str) -> dict[str, str]:
        return {n: self.json("identity", "new", n, connect=False)["account"] for n in names}

    def executed(self) -> int:
        return sum(state.calls["Execute"] for state in self.mesh.states)
