"""Fixtures for the enclave tests: the dev PCK chain, sim providers and an initialized enclave."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.enclave.support import Harness, config, vault
from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sealing import SimSealingProvider
from veil.enclave.providers.sim_quote import SimQuoteProvider
from veil.enclave.runner import PCK_FILES, PCK_KEY_FILE
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import apps_pb2

MakeEnclave = Callable[..., Enclave]


@pytest.fixture(scope="session")
def mrenclave() -> bytes:
    """The sim measurement of the enclave sources under test."""
    return measure_source_tree()


@pytest.fixture(scope="session")
def sim_quotes(pki_dir: Path, mrenclave: bytes) -> SimQuoteProvider:
    """A sim quote provider certified by the session's dev PCK chain."""
    return SimQuoteProvider(
        mrenclave=mrenclave,
        pck_chain_pem=b"".join((pki_dir / name).read_bytes() for name in PCK_FILES),
        pck_leaf_key_pem=(pki_dir / PCK_KEY_FILE).read_bytes(),
        isv_prod_id=7,
        isv_svn=3,
    )


@pytest.fixture
def make_enclave(sim_quotes: SimQuoteProvider, mrenclave: bytes) -> MakeEnclave:
    """Build an uninitialized enclave on a given (or fresh) simulated platform."""

    def make(platform_secret: bytes | None = None, memory_budget: int = 96 * 1024 * 1024) -> Enclave:
        sealing = SimSealingProvider(platform_secret or secrets.token_bytes(32), mrenclave)
        return Enclave(
            mrenclave=mrenclave,
            quote_provider=sim_quotes,
            sealing_provider=sealing,
            default_memory_budget=memory_budget,
        )

    return make


@pytest.fixture
def harness(make_enclave: MakeEnclave) -> Harness:
    """An initialized enclave behind the in-process host client."""
    harness = Harness.start(make_enclave())
    harness.factory = make_enclave
    return harness


@pytest.fixture
def logged(harness: Harness) -> Harness:
    """An enclave with a 9-entry log of "v" (its genesis, then 8 puts of 40 bytes), all of it
    confirmed by the test keyvault: what the restore-in-parts tests cut into parts."""
    harness.create("v", config())
    alice = harness.client("v")
    for i in range(8):
        harness.call(alice, vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=bytes([i]) * 40)))
    return harness
