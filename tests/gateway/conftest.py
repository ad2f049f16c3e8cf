"""Fixtures for the gateway tests: an in-process mesh (real gateway, enclave-backed state)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.support import InProcessMesh, mesh_fixture, token_config
from veil.sdk.client import VeilClient
from veil.sdk.identity import SigningIdentity, new_identity


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path)


@pytest.fixture
def alice(mesh: InProcessMesh) -> SigningIdentity:
    return new_identity(mesh.data_dir, "alice")


@pytest.fixture
def admin(mesh: InProcessMesh) -> Iterator[VeilClient]:
    """An SDK client with the admin certificate."""
    with mesh.connect() as client:
        yield client


@pytest.fixture
def coins(admin: VeilClient, alice: SigningIdentity) -> str:
    """A token instance whose issuer alice holds 1000."""
    admin.create_instance("coins", token_config(alice.public_key))
    admin.token("coins", alice).mint(alice.account, 1000)
    return "coins"
