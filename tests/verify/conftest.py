"""Fixtures: the real SGX quote vectors (see ``vectors``) and a throwaway fake PKI."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from veil.verify.collateral import Collateral
from veil.verify.roots import intel_root_public_key

from . import fakes
from .vectors import ALL_QUOTES, COLLATERAL_A, QUOTE_A, vector_path


@pytest.fixture(scope="session")
def intel_root() -> ec.EllipticCurvePublicKey:
    return intel_root_public_key()


@pytest.fixture(scope="session")
def quotes() -> dict[str, bytes]:
    """All four real quotes by file name."""
    return {name: vector_path(name).read_bytes() for name in ALL_QUOTES}


@pytest.fixture(scope="session")
def quote_a(quotes: dict[str, bytes]) -> bytes:
    return quotes[QUOTE_A]


@pytest.fixture(scope="session")
def collateral_a_json() -> dict[str, Any]:
    """Quote A's collateral as a JSON object, for tests that alter one field."""
    data: dict[str, Any] = json.loads(vector_path(COLLATERAL_A).read_bytes())
    return data


@pytest.fixture(scope="session")
def collateral_a() -> Collateral:
    return Collateral.from_json(vector_path(COLLATERAL_A).read_bytes())


@pytest.fixture(scope="session")
def expected_fields() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads(vector_path("expected_fields.json").read_bytes())
    return data


@pytest.fixture(scope="session")
def fake_pki() -> fakes.FakePki:
    """One throwaway PKI for tests that only read it."""
    return fakes.make_pki()
