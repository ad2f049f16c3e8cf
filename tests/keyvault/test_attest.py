"""The Attest flow with real DCAP v3 quotes from the sim provider (dev PCK chain from `veil pki init`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.enclave.providers.sim_quote import SimQuoteProvider
from veil.enclave.v1 import envelope_pb2
from veil.services.keyvault.attest import Attestor
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.errors import AttestationRefusedError, InvalidArgumentError
from veil.services.keyvault.tokens import TokenIssuer, TokenVerifier
from veil.verify.binding import expected_report_data
from veil.verify.roots import intel_root_public_key, load_root_pem
from veil.verify.tokens import b64url_decode

from .support import CALLER, RELEASE_PUBLIC_KEY, SIM_MRENCLAVE, FakeClock, FakeEnclave, sim_provider


@pytest.fixture
def clock() -> FakeClock:
    """Overrides the shared clock: the dev PCK chain was issued at the real current time."""
    return FakeClock(time.time())


@pytest.fixture
def attestor(issuer: TokenIssuer, audit: AuditLog, clock: FakeClock, pki_dir: Path) -> Attestor:
    return Attestor(
        issuer,
        audit,
        clock,
        root_public_key=load_root_pem(pki_dir / "sgx-root.pem"),
        release_public_key=RELEASE_PUBLIC_KEY,
    )


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
    nonce = os.urandom(32)
    quote = evidence(sim_provider(pki_dir, debug=True), enclave, nonce)
    assert attestor.attest(quote, enclave.runtime_data, nonce, caller=CALLER).claims["x-ms-sgx-is-debuggable"]


def test_report_data_must_bind_runtime_data_and_nonce(
    attestor: Attestor, pki_dir: Path, enclave: FakeEnclave, audit: AuditLog
) -> None:
    nonce = os.urandom(32)
    quote = evidence(sim_provider(pki_dir), enclave, nonce)
    with pytest.raises(AttestationRefusedError, match="report data"):
        attestor.attest(quote, enclave.runtime_data, os.urandom(32), caller=CALLER)
    with pytest.raises(AttestationRefusedError, match="report data"):
        attestor.attest(quote, FakeEnclave().runtime_data, nonce, caller=CALLER)
    event = audit.list_events().events[-1]
    assert (event.action, event.outcome) == ("attest", "refused")
    assert json.loads(event.detail_json)["reason"] == "ATTESTATION_REFUSED"


def test_runtime_data_must_be_enclave_public_keys(attestor: Attestor, pki_dir: Path) -> None:
    nonce = os.urandom(32)
    runtime_data = b"\x0a\x03abc"  # a protobuf, but no usable keys
    quote = sim_provider(pki_dir).quote(expected_report_data(runtime_data, nonce))
    with pytest.raises(AttestationRefusedError) as caught:
        attestor.attest(quote, runtime_data, nonce, caller=CALLER)
    assert caught.value.reason == "RUNTIME_DATA_INVALID"


def test_sim_quote_is_refused_under_the_intel_root(
    issuer: TokenIssuer, audit: AuditLog, clock: FakeClock, pki_dir: Path, enclave: FakeEnclave
) -> None:
    production = Attestor(
        issuer, audit, clock, root_public_key=intel_root_public_key(), release_public_key=RELEASE_PUBLIC_KEY
    )
    nonce = os.urandom(32)
    with pytest.raises(AttestationRefusedError) as caught:
        production.attest(
            evidence(sim_provider(pki_dir), enclave, nonce), enclave.runtime_data, nonce, caller=CALLER
        )
    assert caught.value.reason == "QUOTE_INVALID"
    assert json.loads(audit.list_events().events[-1].detail_json)["reason"] == "QUOTE_INVALID"


def test_tampered_quote_is_refused(attestor: Attestor, pki_dir: Path, enclave: FakeEnclave) -> None:
    nonce = os.urandom(32)
    quote = bytearray(evidence(sim_provider(pki_dir), enclave, nonce))
    quote[112] ^= 0x01  # inside the report body (MRENCLAVE)
    with pytest.raises(AttestationRefusedError) as caught:
        attestor.attest(bytes(quote), enclave.runtime_data, nonce, caller=CALLER)
    assert caught.value.reason == "QUOTE_INVALID"


@pytest.mark.parametrize(
    ("quote", "runtime_data", "nonce"),
    [(b"", b"r", b"n" * 16), (b"q", b"", b"n" * 16), (b"q", b"r", b"n" * 15), (b"q", b"r", b"n" * 65)],
)
def test_input_bounds(attestor: Attestor, quote: bytes, runtime_data: bytes, nonce: bytes) -> None:
    with pytest.raises(InvalidArgumentError):
        attestor.attest(quote, runtime_data, nonce, caller=CALLER)


def test_enclave_pinned_to_another_keyvault_is_refused_and_audited(
    attestor: Attestor, pki_dir: Path, audit: AuditLog
) -> None:
    # A host that pins its own release key could provision keys it knows: no token for it.
    host_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    rogue = FakeEnclave(keyvault_release_public_key=host_key)
    nonce = os.urandom(32)
    quote = evidence(sim_provider(pki_dir), rogue, nonce)
    with pytest.raises(AttestationRefusedError, match="pins another keyvault release key") as caught:
        attestor.attest(quote, rogue.runtime_data, nonce, caller=CALLER)
    assert caught.value.reason == "RELEASE_KEY_MISMATCH"
    event = audit.list_events().events[-1]
    assert (event.action, event.outcome, event.caller) == ("attest", "refused", CALLER)
    facts = json.loads(event.detail_json)
    assert facts["reason"] == "RELEASE_KEY_MISMATCH"
    assert facts["keyvault_release_public_key"] == host_key.hex()
    assert facts["mrenclave"] == SIM_MRENCLAVE.hex()
    # The same enclave pinned to this keyvault is attested, and the token's ehd carries the pin.
    honest = FakeEnclave(keyvault_release_public_key=RELEASE_PUBLIC_KEY)
    issued = attestor.attest(
        evidence(sim_provider(pki_dir), honest, nonce), honest.runtime_data, nonce, caller=CALLER
    )
    ehd = envelope_pb2.EnclavePublicKeys.FromString(b64url_decode(issued.claims["x-ms-sgx-ehd"]))
    assert ehd.keyvault_release_public_key == RELEASE_PUBLIC_KEY
    assert json.loads(audit.list_events().events[-1].detail_json)["keyvault_release_public_key"] == (
        RELEASE_PUBLIC_KEY.hex()
    )


def _runtime_variants(enclave: FakeEnclave) -> dict[str, bytes]:
    canonical = enclave.runtime_data
    keys = envelope_pb2.EnclavePublicKeys.FromString(canonical)
    without_pin = envelope_pb2.EnclavePublicKeys()
    without_pin.CopyFrom(keys)
    without_pin.ClearField("keyvault_release_public_key")
    short_pin = envelope_pb2.EnclavePublicKeys()
    short_pin.CopyFrom(keys)
    short_pin.keyvault_release_public_key = RELEASE_PUBLIC_KEY[:31]
    pin_field = b"\x22\x20"  # field 4, length-delimited, 32 bytes
    return {
        "missing": without_pin.SerializeToString(deterministic=True),
        "short": short_pin.SerializeToString(deterministic=True),
        # Parsers keep the last of duplicates: the first copy would be read another way.
        "duplicated": without_pin.SerializeToString(deterministic=True)
        + pin_field
        + bytes(32)
        + pin_field
        + RELEASE_PUBLIC_KEY,
        # Out of field order: re-serializing gives other bytes.
        "reordered": pin_field + RELEASE_PUBLIC_KEY + without_pin.SerializeToString(deterministic=True),
        # An unknown field (protobuf would carry it along on re-serialization).
        "unknown field": canonical + b"\x2a\x01\x00",
    }


@pytest.mark.parametrize("variant", ["missing", "short", "duplicated", "reordered", "unknown field"])
def test_runtime_data_must_carry_the_pin_canonically(
    attestor: Attestor, pki_dir: Path, enclave: FakeEnclave, variant: str
) -> None:
    runtime_data = _runtime_variants(enclave)[variant]
    nonce = os.urandom(32)
    quote = sim_provider(pki_dir).quote(expected_report_data(runtime_data, nonce))
    with pytest.raises(AttestationRefusedError) as caught:
        attestor.attest(quote, runtime_data, nonce, caller=CALLER)
    assert caught.value.reason == "RUNTIME_DATA_INVALID"


def test_attestor_needs_a_release_key(
    issuer: TokenIssuer, audit: AuditLog, clock: FakeClock, pki_dir: Path
) -> None:
    with pytest.raises(ValueError, match="32-byte"):
        Attestor(
            issuer,
            audit,
            clock,
            root_public_key=load_root_pem(pki_dir / "sgx-root.pem"),
            release_public_key=b"",
        )
