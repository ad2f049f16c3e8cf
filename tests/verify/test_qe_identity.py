"""Intel's QE identity is checked on every quote, with or without collateral.

The forged quotes here are validly signed end to end (the PCK key signs the forged QE report,
which binds the attestation key), so each refusal is the identity check, not a signature.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from veil.enclave.providers import sim_quote
from veil.verify import QeIdentityError, verify_quote
from veil.verify.collateral import Collateral
from veil.verify.verifier import INTEL_QE_ISV_PROD_ID, INTEL_QE_MRSIGNER

from . import fakes
from .vectors import ALL_QUOTES, NOW

DEBUG = 0x02
OTHER_SIGNER = b"\xaa" * 32


def test_the_sim_provider_keeps_an_equal_copy_of_intels_qe_identity() -> None:
    # The enclave may not import services, so the sim QE carries its own copy of the constant.
    assert sim_quote.INTEL_QE_MRSIGNER == INTEL_QE_MRSIGNER
    assert INTEL_QE_MRSIGNER.hex() == "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"
    assert INTEL_QE_ISV_PROD_ID == 1


@pytest.mark.parametrize("name", ALL_QUOTES)
def test_every_real_intel_quote_has_intels_qe(
    name: str, quotes: dict[str, bytes], intel_root: ec.EllipticCurvePublicKey
) -> None:
    qe_report = verify_quote(quotes[name], root_public_key=intel_root, now=NOW).quote.signature_data.qe_report
    assert (qe_report.mr_signer, qe_report.isv_prod_id, qe_report.debug) == (INTEL_QE_MRSIGNER, 1, False)


def test_a_genuine_fake_qe_passes(fake_pki: fakes.FakePki) -> None:
    verify_quote(fakes.build_quote(fake_pki), root_public_key=fake_pki.root_public_key, now=fakes.NOW)


FORGED_QE: list[tuple[dict[str, Any], str]] = [
    (
        {"qe_mrsigner": OTHER_SIGNER},
        f"MRSIGNER {OTHER_SIGNER.hex()} is not Intel's {INTEL_QE_MRSIGNER.hex()}",
    ),
    ({"qe_isv_prod_id": 2}, r"ISVPRODID 2 is not 1 \(QE3\)"),
    (
        {"qe_attributes": bytes([fakes.QE_ATTRIBUTES[0] | DEBUG]) + fakes.QE_ATTRIBUTES[1:]},
        "debug Quoting Enclave",
    ),
]


@pytest.mark.parametrize(("forged", "reason"), FORGED_QE, ids=["mrsigner", "isvprodid", "debug"])
def test_another_qe_is_refused_without_collateral(
    fake_pki: fakes.FakePki, forged: dict[str, Any], reason: str
) -> None:
    quote = fakes.build_quote(fake_pki, **forged)
    with pytest.raises(QeIdentityError, match=reason) as refused:
        verify_quote(quote, root_public_key=fake_pki.root_public_key, now=fakes.NOW)
    assert refused.value.reason.startswith("QE report")


@pytest.mark.parametrize(("forged", "reason"), FORGED_QE[:2], ids=["mrsigner", "isvprodid"])
def test_collateral_naming_another_qe_does_not_lift_the_check(
    fake_pki: fakes.FakePki, forged: dict[str, Any], reason: str
) -> None:
    # Collateral under the pinned root that describes the forged QE: still not Intel's QE.
    identity = fakes.qe_identity_json(
        mrsigner=forged.get("qe_mrsigner", INTEL_QE_MRSIGNER),
        isv_prod_id=forged.get("qe_isv_prod_id", INTEL_QE_ISV_PROD_ID),
    )
    collateral = Collateral.from_json(json.dumps(fakes.build_collateral(fake_pki, qe_identity=identity)))
    with pytest.raises(QeIdentityError, match=reason):
        verify_quote(
            fakes.build_quote(fake_pki, **forged),
            root_public_key=fake_pki.root_public_key,
            collateral=collateral,
            now=fakes.NOW,
        )
