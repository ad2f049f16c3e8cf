"""The SDK's bundle verification: a genuine bundle passes; every tampered piece is refused.

The bundle comes from a real sim enclave (real DCAP v3 quote over the dev PCK chain) with
a token issued by the keyvault's own TokenIssuer, so these are the bytes a mesh serves.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.gateway.support import EnclaveState, TokenAuthority, fake_mesh_policy
from veil.gateway.v1 import gateway_pb2
from veil.sdk.trust_policy import DEFAULT_TCB_STATUSES, ExpectedMeasurement
from veil.verify.bundle import verify_bundle
from veil.verify.errors import AttestationError
from veil.verify.roots import intel_root_public_key, load_root_pem
from veil.verify.tokens import public_jwk

Bundle = gateway_pb2.GetAttestationResponse
HEADER, BODY = 48, 384


@pytest.fixture
def root(pki_dir: Path) -> ec.EllipticCurvePublicKey:
    return load_root_pem(pki_dir / "sgx-root.pem")


def _verify(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, policy: ExpectedMeasurement | None = None
) -> object:
    return verify_bundle(bundle, policy or fake_mesh_policy(), root_public_key=root)


def _refused(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, policy: ExpectedMeasurement | None = None
) -> str:
    with pytest.raises(AttestationError) as refused:
        _verify(bundle, root, policy)
    return refused.value.reason


def test_genuine_bundle_verifies_and_says_what_was_checked(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, enclave_state: EnclaveState
) -> None:
    verified = verify_bundle(bundle, fake_mesh_policy(), root_public_key=root)
    assert verified.keys == enclave_state.keys
    assert verified.mrenclave == fake_mesh_policy().mrenclaves[0]
    assert verified.tcb_status == "Unevaluated"
    assert not verified.debug
    assert verified.token_expires_at > time.time()
    assert not verified.jwks_pinned
    assert any("pinned 'dev' SGX root" in check for check in verified.checks)


def test_pinned_to_another_measurement_is_refused(bundle: Bundle, root: ec.EllipticCurvePublicKey) -> None:
    other = ExpectedMeasurement.for_mrenclave("ab" * 32, root="dev", accepted_tcb_statuses=("*",))
    assert "is not an expected measurement" in _refused(bundle, root, other)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("where", "offset"),
    [
        ("header (QE SVN)", 8),
        ("report body MRENCLAVE", HEADER + 64),
        ("report body attributes (DEBUG bit)", HEADER + 48),
        ("report data", HEADER + 320),
        ("ISV signature", HEADER + BODY + 4 + 3),
        ("attestation key", HEADER + BODY + 4 + 64 + 5),
        ("QE report", HEADER + BODY + 4 + 128 + 70),
    ],
)
def test_any_tampered_quote_byte_is_refused(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, where: str, offset: int
) -> None:
    bundle.quote = _flip(bundle.quote, offset)
    assert _refused(bundle, root).startswith("quote: "), where


def test_truncated_quote_and_foreign_root_are_refused(
    bundle: Bundle, root: ec.EllipticCurvePublicKey
) -> None:
    genuine = bundle.quote
    bundle.quote = genuine[:-10]
    assert _refused(bundle, root).startswith("quote: ")
    bundle.quote = genuine
    assert _refused(bundle, intel_root_public_key()).startswith("quote: ")


def test_tampered_runtime_data_or_nonce_breaks_the_report_data_binding(
    bundle: Bundle, root: ec.EllipticCurvePublicKey
) -> None:
    genuine = bundle.runtime_data
    bundle.runtime_data = genuine + b"\x00"
    assert "report data" in _refused(bundle, root)
    bundle.runtime_data = genuine
    bundle.nonce = _flip(bundle.nonce, 0)
    assert "report data" in _refused(bundle, root)


def test_substituted_keys_are_refused(bundle: Bundle, root: ec.EllipticCurvePublicKey) -> None:
    bundle.keys.hpke_x25519_public_key = bytes(32)  # the gateway's own key, say
    assert "keys are not the attested runtime data" in _refused(bundle, root)


def _resign(token: str, change: Callable[[dict[str, object]], None]) -> str:
    header_b64, payload_b64, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    change(payload)
    encoded = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"{header_b64}.{encoded}.{signature}"


def test_tampered_token_claims_or_signature_are_refused(
    bundle: Bundle, root: ec.EllipticCurvePublicKey
) -> None:
    genuine = bundle.attestation_token
    bundle.attestation_token = _resign(
        genuine, lambda claims: claims.update({"x-ms-sgx-tcb-status": "UpToDate"})
    )
    assert "signature" in _refused(bundle, root)
    head, payload, signature = genuine.split(".")
    bundle.attestation_token = f"{head}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    assert _refused(bundle, root).startswith("token: ")
    bundle.attestation_token = jwt.encode({"iss": "x"}, None, algorithm="none")  # type: ignore[arg-type]
    assert _refused(bundle, root).startswith("token: ")


def test_a_token_forged_with_the_gateways_own_jwks_is_caught_by_the_quote_binding(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, enclave_state: EnclaveState
) -> None:
    """A gateway can substitute token and JWKS, but not a quote over other keys."""
    forger = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(forger.public_key())
    claims = jwt.decode(bundle.attestation_token, options={"verify_signature": False})
    fake_keys = gateway_pb2.GetAttestationResponse(keys=enclave_state.keys).keys
    fake_keys.hpke_x25519_public_key = bytes(range(32))
    fake_runtime = fake_keys.SerializeToString(deterministic=True)
    claims["x-ms-sgx-ehd"] = base64.urlsafe_b64encode(fake_runtime).decode().rstrip("=")
    bundle.attestation_token = jwt.encode(
        claims, forger, algorithm="ES256", headers={"kid": jwk["kid"], "typ": "JWT"}
    )
    bundle.jwks_json = json.dumps({"keys": [jwk]})
    bundle.runtime_data = fake_runtime
    bundle.keys.CopyFrom(fake_keys)
    assert "report data" in _refused(bundle, root)


def test_token_for_other_runtime_data_is_refused(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, enclave_state: EnclaveState, authority: TokenAuthority
) -> None:
    """A genuine token from the same keyvault, but for another enclave's keys."""
    claims = jwt.decode(bundle.attestation_token, options={"verify_signature": False})
    kid, private = authority.ring.current()
    claims["x-ms-sgx-ehd"] = base64.urlsafe_b64encode(b"other enclave").decode().rstrip("=")
    bundle.attestation_token = jwt.encode(
        claims, private, algorithm="ES256", headers={"kid": kid, "typ": "JWT"}
    )
    assert "ehd" in _refused(bundle, root)


def test_pinned_jwks_and_issuer_must_match(bundle: Bundle, root: ec.EllipticCurvePublicKey) -> None:
    other = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    pinned = dataclasses.replace(fake_mesh_policy(), jwks={"keys": [other]})
    assert "not a known signing key" in _refused(bundle, root, pinned)
    genuine = json.loads(bundle.jwks_json)
    assert verify_bundle(
        bundle, dataclasses.replace(fake_mesh_policy(), jwks=genuine), root_public_key=root
    ).jwks_pinned
    wrong_issuer = dataclasses.replace(fake_mesh_policy(), issuer="https://other-keyvault")
    assert "issuer" in _refused(bundle, root, wrong_issuer)


def test_expired_token_is_refused(bundle: Bundle, root: ec.EllipticCurvePublicKey) -> None:
    with pytest.raises(AttestationError, match="expired"):
        verify_bundle(bundle, fake_mesh_policy(), root_public_key=root, now=time.time() + 3600)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mrsigner": bytes(32)}, "MRSIGNER"),
        ({"product_id": 9}, "product id"),
        ({"min_svn": 2}, "below the minimum"),
        ({"accepted_tcb_statuses": DEFAULT_TCB_STATUSES}, "TCB status 'Unevaluated'"),
    ],
)
def test_policy_fields_are_enforced(
    bundle: Bundle, root: ec.EllipticCurvePublicKey, change: dict[str, object], reason: str
) -> None:
    # Restricting the TCB status needs the keyvault's JWKS pinned (veil/sdk/trust_policy.py).
    policy = dataclasses.replace(fake_mesh_policy(), jwks=json.loads(bundle.jwks_json), **change)  # type: ignore[arg-type]
    assert reason in _refused(bundle, root, policy)


def test_mrsigner_policy_without_mrenclave_accepts_any_build_of_the_signer(
    bundle: Bundle, root: ec.EllipticCurvePublicKey
) -> None:
    by_signer = dataclasses.replace(fake_mesh_policy(), mrenclaves=())
    assert verify_bundle(bundle, by_signer, root_public_key=root).product_id == 1


def test_debuggable_enclave_is_refused_unless_the_policy_allows_it(
    pki_dir: Path, tmp_path: Path, authority: TokenAuthority, root: ec.EllipticCurvePublicKey
) -> None:
    bundle = EnclaveState(pki_dir, tmp_path, authority, debug=True).bundle
    assert "debuggable" in _refused(bundle, root)
    assert verify_bundle(
        bundle, dataclasses.replace(fake_mesh_policy(), allow_debug=True), root_public_key=root
    ).debug


def test_policy_without_a_keyvault_pin_refuses(bundle: Bundle, root: ec.EllipticCurvePublicKey) -> None:
    unpinned = dataclasses.replace(fake_mesh_policy(), keyvault_release_key=None)
    assert "pins no keyvault release key" in _refused(bundle, root, unpinned)


def test_enclave_pinned_to_another_keyvault_is_refused(
    bundle: Bundle, root: ec.EllipticCurvePublicKey
) -> None:
    # A genuine enclave started by the host against a keyvault of its own: the host could
    # provision keys it knows, so the client must not send it anything.
    other = dataclasses.replace(fake_mesh_policy(), keyvault_release_key=b"\x01" * 32)
    assert "another keyvault" in _refused(bundle, root, other)
