"""The Attest flow with real DCAP v3 quotes from the sim provider (dev PCK chain from `veil pki init`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from enclave.providers.sim_quote import SimQuoteProvider
from services.keyvault.attest import Attestor
from services.keyvault.attestation.roots import intel_root_public_key, load_root_pem
from services.keyvault.audit import AuditLog
from services.keyvault.errors import AttestationError, InvalidArgumentError
from services.keyvault.tokens import TokenIssuer, TokenVerifier, b64url_decode, expected_report_data

from .support import CALLER, SIM_MRENCLAVE, FakeClock, FakeEnclave, sim_provider


@pytest.fixture
def clock() -> FakeClock:
    """Overrides the shared clock: the dev PCK chain was issued at the real current time."""
    return FakeClock(time.time())


@pytest.fixture
def attestor(issuer: TokenIssuer, audit: AuditLog, clock: FakeClock, pki_dir: Path) -> Attestor:
    return Attestor(issuer, audit, clock, root_public_key=load_root_pem(pki_dir / "sgx-root.pem"))


def evidence(provider: SimQuoteProvider, enclave: FakeEnclave, nonce: bytes) -> bytes:
    return provider.quote(expected_report_data(enclave.runtime_data, nonce))


def test_sim_quote_gives_a_token(
    attestor: Attestor, pki_dir: Path, enclave: FakeEnclave, audit: AuditLog, verifier: TokenVerifier
) -> None:
    nonce = os.urandom(32)
    quote = evidence(sim_provider(pki_dir), enclave, nonce)
    issued = attestor.attest(quote, enclave.runtime_data, nonce, caller=CALLER)
    claims = issued.claims
    assert claims["x-ms-sgx-mrenclave"] == SIM_MRENCLAVE.hex()
    assert claims["x-ms-sgx-is-debuggable"] is False
    assert claims["x-ms-sgx-tcb-status"] == "Unevaluated"  # no collateral for sim quotes
    assert claims["x-ms-sgx-collateral"]["quotehash"] == hashlib.sha256(quote).hexdigest()
    assert b64url_decode(claims["x-ms-sgx-ehd"]) == enclave.runtime_data
    event = audit.list_events().events[-1]
    assert (event.action, event.outcome, event.caller) == ("attest", "allowed", CALLER)
    assert json.loads(event.detail_json)["jti"] == issued.jti


def test_debug_sim_quote_is_reported_as_debuggable(
    attestor: Attestor, pki_dir: Path, enclave: FakeEnclave
) -> None:
    nonce = os.urandom(16)
    quote = evidence(sim_provider(pki_dir, debug=True), enclave, nonce)
    assert attestor.attest(quote, enclave.runtime_data, nonce, caller=CALLER).claims["x-ms-sgx-is-debuggable"]


def test_report_data_must_bind_runtime_data_and_nonce(
    attestor: Attestor, pki_dir: Path, enclave: FakeEnclave, audit: AuditLog
) -> None:
    nonce = os.urandom(16)
    quote = evidence(sim_provider(pki_dir), enclave, nonce)
    with pytest.raises(AttestationError, match="report data"):
        attestor.attest(quote, enclave.runtime_data, os.urandom(16), caller=CALLER)
    with pytest.raises(AttestationError, match="report data"):
        attestor.attest(quote, FakeEnclave().runtime_data, nonce, caller=CALLER)
    event = audit.list_events().events[-1]
    assert (event.action, event.outcome) == ("attest", "refused")
    assert json.loads(event.detail_json)["reason"] == "ATTESTATION_REFUSED"


def test_runtime_data_must_be_enclave_public_keys(attestor: Attestor, pki_dir: Path) -> None:
    nonce = os.urandom(16)
    runtime_data = b"\x0a\x03abc"  # a protobuf, but no usable keys
    quote = sim_provider(pki_dir).quote(expected_report_data(runtime_data, nonce))
    with pytest.raises(AttestationError) as caught:
        attestor.attest(quote, runtime_data, nonce, caller=CALLER)
    assert caught.value.reason == "RUNTIME_DATA_INVALID"


def test_sim_quote_is_refused_under_the_intel_root(
    issuer: TokenIssuer, audit: AuditLog, clock: FakeClock, pki_dir: Path, enclave: FakeEnclave
) -> None:
    production = Attestor(issuer, audit, clock, root_public_key=intel_root_public_key())
    nonce = os.urandom(16)
    with pytest.raises(AttestationError) as caught:
        production.attest(
            evidence(sim_provider(pki_dir), enclave, nonce), enclave.runtime_data, nonce, caller=CALLER
        )
    assert caught.value.reason == "QUOTE_INVALID"
    assert json.loads(audit.list_events().events[-1].detail_json)["reason"] == "QUOTE_INVALID"


def test_tampered_quote_is_refused(attestor: Attestor, pki_dir: Path, enclave: FakeEnclave) -> None:
    nonce = os.urandom(16)
    quote = bytearray(evidence(sim_provider(pki_dir), enclave, nonce))
    quote[112] ^= 0x01  # inside the report body (MRENCLAVE)
    with pytest.raises(AttestationError) as caught:
        attestor.attest(bytes(quote), enclave.runtime_data, nonce, caller=CALLER)
    assert caught.value.reason == "QUOTE_INVALID"


@pytest.mark.parametrize(
    ("quote", "runtime_data", "nonce"),
    [(b"", b"r", b"n" * 16), (b"q", b"", b"n" * 16), (b"q", b"r", b"n" * 15), (b"q", b"r", b"n" * 65)],
)
def test_input_bounds(attestor: Attestor, quote: bytes, runtime_data: bytes, nonce: bytes) -> None:
    with pytest.raises(InvalidArgumentError):
        attestor.attest(quote, runtime_data, nonce, caller=CALLER)
