"""The expected-measurement policy: a TCB restriction needs a pinned JWKS, and `veil up` pins it.

The last tests play the forged-TCB-status attack on real bytes (a sim quote over the dev PCK
chain, tokens from the keyvault's own TokenIssuer): a gateway signs a token of its own that
copies every quote-bound claim and says "UpToDate".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.keyvault.support import RELEASE_PUBLIC_KEY, SIM_MRENCLAVE, FakeEnclave, sim_provider
from veil.cli import common
from veil.dev.pki import sim_collateral_path
from veil.dev.policies import DEV_TCB_STATUSES, dev_policy, write_dev_policy
from veil.enclave.providers.sim_quote import DEV_MRSIGNER
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.errors import PolicyError, VeilClientError
from veil.sdk.trust_policy import (
    ALL_TCB_STATUSES,
    DEFAULT_TCB_STATUSES,
    POLICY_FILE,
    ExpectedMeasurement,
    load_policy,
    save_policy,
)
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.keyvault.tokens import SigningKeyRing, TokenIssuer
from veil.verify import VerifiedQuote, verify_quote
from veil.verify.binding import expected_report_data
from veil.verify.bundle import verify_bundle
from veil.verify.collateral import load_collateral
from veil.verify.errors import AttestationError
from veil.verify.roots import load_root_pem

ISSUER = "spiffe://veil/keyvault"
JWKS: dict[str, Any] = {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k"}]}


def _policy(**options: Any) -> ExpectedMeasurement:
    return ExpectedMeasurement(mrenclaves=(b"\x01" * 32,), keyvault_release_key=b"\x02" * 32, **options)


# --- the rule ------------------------------------------------------------------------------


def test_a_tcb_restriction_without_a_pinned_jwks_is_refused(tmp_path: Path) -> None:
    # The production default statuses, or any other restriction.
    for options in (
        {},
        {"accepted_tcb_statuses": ("UpToDate",)},
        {"accepted_tcb_statuses": ("Unevaluated",)},
    ):
        with pytest.raises(PolicyError, match="must pin jwks") as refused:
            _policy(**options)
        assert "only as trustworthy as the key that signed it" in str(refused.value)
    with pytest.raises(PolicyError, match="must pin jwks"):
        ExpectedMeasurement.for_mrenclave("aa" * 32)
    path = tmp_path / POLICY_FILE
    path.write_text(json.dumps({"mrenclave": "aa" * 32, "accepted_tcb_statuses": ["UpToDate"]}))
    with pytest.raises(PolicyError, match="must pin jwks"):
        load_policy(path)
    path.write_text(json.dumps({"mrenclave": "aa" * 32}))  # the default statuses restrict too
    with pytest.raises(PolicyError, match="must pin jwks"):
        load_policy(path)


def test_a_pinned_jwks_allows_any_restriction() -> None:
    assert _policy(jwks=JWKS).accepted_tcb_statuses == DEFAULT_TCB_STATUSES
    assert _policy(jwks=JWKS, accepted_tcb_statuses=("UpToDate",)).jwks == JWKS


def test_star_accepts_every_status_and_needs_no_jwks(tmp_path: Path) -> None:
    policy = _policy(accepted_tcb_statuses=("*",))
    assert policy.accepts_every_tcb_status
    assert policy.accepted_tcb_statuses == ALL_TCB_STATUSES
    assert {"UpToDate", "OutOfDate", "Unevaluated", "Revoked"} <= set(policy.accepted_tcb_statuses)
    assert policy.to_json()["accepted_tcb_statuses"] == ["*"]
    loaded = load_policy(save_policy(policy, tmp_path / POLICY_FILE))
    assert loaded == policy
    assert json.loads((tmp_path / POLICY_FILE).read_text())["accepted_tcb_statuses"] == ["*"]
    # Listing every status is the same policy.
    assert _policy(accepted_tcb_statuses=ALL_TCB_STATUSES).accepts_every_tcb_status


@pytest.mark.parametrize(
    ("statuses", "jwks", "reason"),
    [
        (("*", "UpToDate"), None, "must stand alone"),
        (("UpToDate", "UpTodate"), JWKS, "unknown TCB status"),
        ((), JWKS, "must not be empty"),
        (("UpToDate",), {"keys": []}, "non-empty"),
        (("UpToDate",), {"kty": "EC"}, "non-empty"),
    ],
)
def test_malformed_statuses_and_jwks_are_refused(
    statuses: tuple[str, ...], jwks: dict[str, Any] | None, reason: str
) -> None:
    with pytest.raises(PolicyError, match=reason):
        _policy(accepted_tcb_statuses=statuses, jwks=jwks)


def test_the_dev_policy_pins_the_keyvaults_jwks(tmp_path: Path) -> None:
    policy = dev_policy(keyvault_release_key=b"\x07" * 32, jwks=JWKS)
    assert policy.jwks == JWKS
    assert policy.accepted_tcb_statuses == DEV_TCB_STATUSES == DEFAULT_TCB_STATUSES
    assert "Unevaluated" not in policy.accepted_tcb_statuses
    path = write_dev_policy(tmp_path, b"\x07" * 32, JWKS)
    assert json.loads(path.read_text())["jwks"] == JWKS
    loaded = load_policy(path)
    assert loaded == policy
    assert loaded.jwks == JWKS


def test_the_cli_restricts_the_tcb_status_only_with_a_pinned_jwks(tmp_path: Path) -> None:
    args = argparse.Namespace(mrenclave=["aa" * 32], root="dev", jwks=None, policy=None, data_dir=tmp_path)
    unpinned = common.trust_policy(args)
    assert (unpinned.jwks, unpinned.accepts_every_tcb_status, unpinned.root) == (None, True, "dev")
    (tmp_path / "jwks.json").write_text(json.dumps(JWKS))
    pinned = common.trust_policy(argparse.Namespace(**{**vars(args), "jwks": tmp_path / "jwks.json"}))
    assert (pinned.jwks, pinned.accepted_tcb_statuses) == (JWKS, DEFAULT_TCB_STATUSES)
    (tmp_path / "jwks.json").write_text("[]")
    with pytest.raises(VeilClientError, match="expected a JSON object"):
        common.trust_policy(argparse.Namespace(**{**vars(args), "jwks": tmp_path / "jwks.json"}))


# --- the attack ----------------------------------------------------------------------------


@dataclasses.dataclass
class Keyvault:
    """A token issuer on the keyvault's libraries: the honest keyvault, or a hostile gateway's."""

    issuer: TokenIssuer
    ring: SigningKeyRing
    store: SqliteStore

    def jwks(self) -> dict[str, Any]:
        return self.ring.jwks()


@pytest.fixture
def keyvaults(tmp_path: Path) -> Iterator[tuple[Keyvault, Keyvault]]:
    made = []
    for name in ("keyvault", "gateway"):
        store = SqliteStore(tmp_path / f"{name}.db")
        audit = AuditLog(store, time.time)
        ring = SigningKeyRing(store, FileKek(tmp_path / f"{name}.kek"), time.time, audit)
        ring.current()  # a signing key exists, as the keyvault ensures at start
        made.append(Keyvault(TokenIssuer(ring, issuer=ISSUER, clock=time.time), ring, store))
    yield made[0], made[1]
    for keyvault in made:
        keyvault.store.close()


def _bundle(
    pki_dir: Path, keyvault: Keyvault, *, collateral: bool, forge_with: Keyvault | None = None
) -> gateway_pb2.GetAttestationResponse:
    """A sim enclave's bundle; with `forge_with`, the token is re-issued there saying UpToDate."""
    enclave = FakeEnclave()
    nonce = os.urandom(32)
    quote = sim_provider(pki_dir).quote(expected_report_data(enclave.runtime_data, nonce))
    verified: VerifiedQuote = verify_quote(
        quote,
        root_public_key=load_root_pem(pki_dir / "sgx-root.pem"),
        collateral=load_collateral(sim_collateral_path(pki_dir)) if collateral else None,
    )
    signer = keyvault
    if forge_with is not None:
        verified, signer = dataclasses.replace(verified, tcb_status="UpToDate"), forge_with
    token = signer.issuer.issue(
        verified, runtime_data=enclave.runtime_data, nonce=nonce, quote_hash=hashlib.sha256(quote).digest()
    )
    return gateway_pb2.GetAttestationResponse(
        quote=quote,
        runtime_data=enclave.runtime_data,
        nonce=nonce,
        attestation_token=token.token,
        keys=envelope_pb2.EnclavePublicKeys.FromString(enclave.runtime_data),
        jwks_json=json.dumps(signer.jwks()),  # a hostile gateway delivers its own JWKS
    )


def _sim_policy(**options: Any) -> ExpectedMeasurement:
    return ExpectedMeasurement(
        mrenclaves=(SIM_MRENCLAVE,),
        mrsigner=DEV_MRSIGNER,
        root="dev",
        issuer=ISSUER,
        keyvault_release_key=RELEASE_PUBLIC_KEY,
        **options,
    )


def test_a_forged_tcb_status_is_refused_under_a_pinned_jwks(
    pki_dir: Path, keyvaults: tuple[Keyvault, Keyvault]
) -> None:
    keyvault, gateway = keyvaults
    root = load_root_pem(pki_dir / "sgx-root.pem")
    pinned = _sim_policy(jwks=keyvault.jwks())

    # The keyvault had no collateral: its honest token says Unevaluated, which is not accepted.
    honest = _bundle(pki_dir, keyvault, collateral=False)
    with pytest.raises(AttestationError, match="TCB status 'Unevaluated' is not accepted"):
        verify_bundle(honest, pinned, root_public_key=root)

    # The gateway re-signs every claim the quote binds, with "UpToDate", under its own key.
    forged = _bundle(pki_dir, keyvault, collateral=False, forge_with=gateway)
    with pytest.raises(AttestationError, match=r"^attestation refused: token: ") as refused:
        verify_bundle(forged, pinned, root_public_key=root)
    assert "TCB" not in refused.value.reason  # refused for the signature, before any TCB check

    # The same restriction without the pin cannot even be written down.
    with pytest.raises(PolicyError, match="must pin jwks"):
        _sim_policy()


def test_with_dev_collateral_the_sim_mesh_is_up_to_date_under_the_pinned_jwks(
    pki_dir: Path, keyvaults: tuple[Keyvault, Keyvault]
) -> None:
    keyvault, _ = keyvaults
    verified = verify_bundle(
        _bundle(pki_dir, keyvault, collateral=True),
        _sim_policy(jwks=keyvault.jwks()),
        root_public_key=load_root_pem(pki_dir / "sgx-root.pem"),
    )
    assert (verified.tcb_status, verified.jwks_pinned) == ("UpToDate", True)
