"""Fixtures for the gateway tests: an in-process mesh (real gateway, enclave-backed state)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.support import InProcessMesh, mesh_fixture


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path)
