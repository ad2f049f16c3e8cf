"""Fixtures for the CLI tests: an in-process mesh per test and `veil` run in process against it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.support import Veil
from tests.gateway.support import InProcessMesh, mesh_fixture


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path)


@pytest.fixture
def veil(mesh: InProcessMesh, capsys: pytest.CaptureFixture[str]) -> Veil:
    return Veil(mesh, capsys)
