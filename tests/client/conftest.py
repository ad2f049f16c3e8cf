"""Fixtures for the SDK tests: a real attestation bundle, and the in-process mesh."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.support import EnclaveState, InProcessMesh, TokenAuthority, mesh_fixture
from veil.gateway.v1 import gateway_pb2


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuthority]:
    authority = TokenAuthority(tmp_path_factory.mktemp("keyvault"))
    yield authority
    authority.close()


@pytest.fixture(scope="module")
def enclave_state(
    pki_dir: Path, tmp_path_factory: pytest.TempPathFactory, authority: TokenAuthority
) -> EnclaveState:
    """A real enclave (sim) with a real keyvault-style token over its quote."""
    return EnclaveState(pki_dir, tmp_path_factory.mktemp("enclave"), authority)


@pytest.fixture
def bundle(enclave_state: EnclaveState) -> gateway_pb2.GetAttestationResponse:
    """A fresh copy of the genuine bundle, as the gateway would return it (tests tamper with it)."""
    bundle = gateway_pb2.GetAttestationResponse()
    bundle.CopyFrom(enclave_state.bundle)
    return bundle


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    yield from mesh_fixture(pki_dir, tmp_path)
