"""Collateral: Intel's signed TCB info / QE identity / CRLs for quote A, and fakes for the rest."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.verify.collateral import (
    CONFIGURATION_AND_SW_HARDENING_NEEDED,
    CONFIGURATION_NEEDED,
    OUT_OF_DATE,
    OUT_OF_DATE_CONFIGURATION_NEEDED,
    REVOKED,
    SW_HARDENING_NEEDED,
    UP_TO_DATE,
    Collateral,
    merge_tcb_status,
)
from veil.verify.errors import CollateralError, CollateralExpiredError, QuoteError, RevokedError
from veil.verify.pck import _signed_by
from veil.verify.verifier import VerifiedQuote, verify_quote

from . import fakes
from .vectors import AFTER_COLLATERAL, NOW


def _collateral(obj: dict[str, Any]) -> Collateral:
    return Collateral.from_json(json.dumps(obj))


# --- quote A with Intel's collateral -----------------------------------------------------


def test_quote_a_tcb_status_and_advisories(
    quote_a: bytes, collateral_a: Collateral, intel_root: ec.EllipticCurvePublicKey
) -> None:
    result = verify_quote(quote_a, root_public_key=intel_root, collateral=collateral_a, now=NOW)
    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert result.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert result.tcb is not None
    assert result.tcb.qe_tcb_level.status == "UpToDate"  # QE ISVSVN 10 >= 8
    assert result.to_json_dict()["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert result.to_json_dict()["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


@pytest.mark.parametrize(
    "when",
    [
        AFTER_COLLATERAL,
        datetime(2025, 7, 19, 10, 56, 12, tzinfo=UTC),  # one second after TCB nextUpdate
        datetime(2025, 7, 19, 10, 30, tzinfo=UTC),  # PCK CRL and QE identity expired
        datetime(2025, 6, 19, 10, 0, tzinfo=UTC),  # before the CRL and TCB info were issued
    ],
)
def test_quote_a_collateral_outside_its_window_is_refused(
    quote_a: bytes, collateral_a: Collateral, intel_root: ec.EllipticCurvePublicKey, when: datetime
) -> None:
    with pytest.raises(CollateralExpiredError) as info:
        verify_quote(quote_a, root_public_key=intel_root, collateral=collateral_a, now=when)
    assert "expired" in info.value.reason or "not yet valid" in info.value.reason


def test_quote_a_still_verifies_without_collateral_after_its_window(
    quote_a: bytes, intel_root: ec.EllipticCurvePublicKey
) -> None:
    assert verify_quote(quote_a, root_public_key=intel_root, now=AFTER_COLLATERAL).tcb_status is None


@pytest.mark.parametrize(
    ("key", "old", "new", "reason"),
    [
        ("tcb_info", '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18', "TCB info signature"),
        ("tcb_info", '"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', "TCB info signature"),
        ("tcb_info", '"pcesvn":13', '"pcesvn":12', "TCB info signature"),
        ("tcb_info", '{"id"', ' {"id"', "TCB info signature"),
        ("qe_identity", '"isvsvn":8', '"isvsvn":9', "QE identity signature"),
        ("qe_identity", '"isvprodid":1', '"isvprodid":2', "QE identity signature"),
    ],
)
def test_tampered_signed_document_is_refused(
    quote_a: bytes,
    collateral_a_json: dict[str, Any],
    intel_root: ec.EllipticCurvePublicKey,
    key: str,
    old: str,
    new: str,
    reason: str,
) -> None:
    assert old in collateral_a_json[key]
    forged = dict(collateral_a_json, **{key: collateral_a_json[key].replace(old, new, 1)})
    with pytest.raises(CollateralError, match=reason):
        verify_quote(quote_a, root_public_key=intel_root, collateral=_collateral(forged), now=NOW)


@pytest.mark.parametrize("key", ["tcb_info_signature", "qe_identity_signature"])
@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_tampered_signature_is_refused(
    quote_a: bytes,
    collateral_a_json: dict[str, Any],
    intel_root: ec.EllipticCurvePublicKey,
    key: str,
    position: int,
) -> None:
    signature = bytearray.fromhex(collateral_a_json[key])
    signature[position] ^= 0x01
    forged = dict(collateral_a_json, **{key: signature.hex()})
    with pytest.raises(CollateralError, match="signature does not verify"):
        verify_quote(quote_a, root_public_key=intel_root, collateral=_collateral(forged), now=NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"root_ca_crl": "pck_crl"}, "root CA CRL issuer"),
        ({"pck_crl": "root_ca_crl"}, "PCK CRL issuer"),
        ({"tcb_info_issuer_chain": "pck_crl_issuer_chain"}, "must not be a CA"),
        ({"pck_crl_issuer_chain": "tcb_info_issuer_chain"}, "not a CA certificate"),
        ({"tcb_info_signature": "qe_identity_signature"}, "TCB info signature"),
        ({"tcb_info": "qe_identity", "tcb_info_signature": "qe_identity_signature"}, "TCB info"),
    ],
)
def test_misplaced_collateral_is_refused(
    quote_a: bytes,
    collateral_a_json: dict[str, Any],
    intel_root: ec.EllipticCurvePublicKey,
    change: dict[str, str],
    reason: str,
) -> None:
    forged = dict(collateral_a_json)
    for target, source in change.items():
        forged[target] = collateral_a_json[source]
    with pytest.raises(CollateralError, match=reason):
        verify_quote(quote_a, root_public_key=intel_root, collateral=_collateral(forged), now=NOW)


def test_tampered_crl_is_refused(
    quote_a: bytes, collateral_a_json: dict[str, Any], intel_root: ec.EllipticCurvePublicKey
) -> None:
    for key in ("root_ca_crl", "pck_crl"):
        crl = bytearray.fromhex(collateral_a_json[key])
        crl[-5] ^= 0x01  # inside the signature
        forged = dict(collateral_a_json, **{key: crl.hex()})
        with pytest.raises(CollateralError):
            verify_quote(quote_a, root_public_key=intel_root, collateral=_collateral(forged), now=NOW)


def test_collateral_for_another_platform_is_refused(
    quotes: dict[str, bytes], collateral_a: Collateral, intel_root: ec.EllipticCurvePublicKey
) -> None:
    from .vectors import QUOTE_B

    # B's PCK leaf is from the same Processor CA but another FMSPC.
    with pytest.raises(CollateralError, match="FMSPC"):
        verify_quote(quotes[QUOTE_B], root_public_key=intel_root, collateral=collateral_a, now=NOW)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"tcb_info": "x"}',
        '{"a": 1, "a": 2}',
    ],
)
def test_malformed_collateral_json_is_refused(text: str) -> None:
    with pytest.raises(CollateralError):
        Collateral.from_json(text)


def test_collateral_fields_must_be_well_typed(collateral_a_json: dict[str, Any]) -> None:
    for key, value in [
        ("tcb_info_signature", "zz"),
        ("tcb_info_signature", "00" * 63),
        ("root_ca_crl", "not hex"),
        ("tcb_info", 5),
    ]:
        with pytest.raises(CollateralError):
            _collateral(dict(collateral_a_json, **{key: value}))


# --- fake PKI: revocation, TCB levels, QE identity ---------------------------------------


def _verify_fake(pki: fakes.FakePki, *, quote: bytes | None = None, **collateral: Any) -> VerifiedQuote:
    return verify_quote(
        quote if quote is not None else fakes.build_quote(pki),
        root_public_key=pki.root_public_key,
        collateral=_collateral(fakes.build_collateral(pki, **collateral)),
        now=NOW,
    )


def test_fake_collateral_up_to_date(fake_pki: fakes.FakePki) -> None:
    result = _verify_fake(fake_pki)
    assert (result.tcb_status, result.advisory_ids) == ("UpToDate", ())


def test_revoked_pck_leaf_is_refused(fake_pki: fakes.FakePki) -> None:
    crl = fakes.make_crl(fake_pki.ca, fake_pki.ca_key, revoked=(fake_pki.leaf,))
    with pytest.raises(RevokedError, match="PCK certificate"):
        _verify_fake(fake_pki, pck_crl=crl)


def test_revoked_pck_ca_is_refused(fake_pki: fakes.FakePki) -> None:
    crl = fakes.make_crl(fake_pki.root, fake_pki.root_key, revoked=(fake_pki.ca,))
    with pytest.raises(RevokedError, match="PCK CA"):
        _verify_fake(fake_pki, root_crl=crl)


def test_revoked_tcb_signer_is_refused(fake_pki: fakes.FakePki) -> None:
    crl = fakes.make_crl(fake_pki.root, fake_pki.root_key, revoked=(fake_pki.tcb_signer,))
    with pytest.raises(RevokedError, match="TCB info issuer chain signer"):
        _verify_fake(fake_pki, root_crl=crl)


def test_crl_signed_by_the_wrong_key_is_refused(fake_pki: fakes.FakePki) -> None:
    crl = fakes.make_crl(fake_pki.ca, fakes.new_key())
    with pytest.raises(CollateralError, match="PCK CRL signature"):
        _verify_fake(fake_pki, pck_crl=crl)


def test_stale_crl_is_refused(fake_pki: fakes.FakePki) -> None:
    crl = fakes.make_crl(
        fake_pki.ca,
        fake_pki.ca_key,
        last_update=datetime(2025, 5, 1, tzinfo=UTC),
        next_update=datetime(2025, 6, 1, tzinfo=UTC),
    )
    with pytest.raises(CollateralExpiredError, match="PCK CRL expired"):
        _verify_fake(fake_pki, pck_crl=crl)


def test_stale_tcb_info_is_refused(fake_pki: fakes.FakePki) -> None:
    tcb_info = fakes.tcb_info_json(next_update=datetime(2025, 6, 30, tzinfo=UTC))
    with pytest.raises(CollateralExpiredError, match="TCB info expired"):
        _verify_fake(fake_pki, tcb_info=tcb_info)


def test_stale_qe_identity_is_refused(fake_pki: fakes.FakePki) -> None:
    qe_identity = fakes.qe_identity_json(issued=datetime(2025, 7, 2, tzinfo=UTC))
    with pytest.raises(CollateralExpiredError, match="QE identity is not yet valid"):
        _verify_fake(fake_pki, qe_identity=qe_identity)


def test_collateral_signed_outside_the_tcb_signing_role_is_refused(
    fake_pki: fakes.FakePki,
) -> None:
    key = fakes.new_key()
    impostor = fakes.make_cert(
        subject="Test SGX Random Service",
        key=key,
        issuer=fake_pki.root,
        issuer_key=fake_pki.root_key,
        ca=False,
    )
    with pytest.raises(CollateralError, match="TCB Signing"):
        _verify_fake(fake_pki, tcb_signer=(impostor, key))


def test_collateral_signed_under_another_root_is_refused(fake_pki: fakes.FakePki) -> None:
    # A TCB Signing certificate of another root, presented under ours.
    other = fakes.make_pki()
    with pytest.raises(CollateralError, match="not signed by its issuer"):
        _verify_fake(fake_pki, tcb_signer=(other.tcb_signer, other.tcb_key))


@pytest.mark.parametrize(
    ("tcb_info", "reason"),
    [
        (fakes.tcb_info_json(fmspc=bytes.fromhex("00906ea10001")), "FMSPC"),
        (fakes.tcb_info_json(pce_id=bytes.fromhex("0100")), "PCEID"),
        (fakes.tcb_info_json(version=2), "version 3"),
        (fakes.tcb_info_json(tcb_id="TDX"), "version 3"),
        (fakes.tcb_info_json(levels=[]), "no tcbLevels"),
        (fakes.tcb_info_json(levels=[fakes.tcb_level("Great")]), "unknown tcbStatus"),
        (
            fakes.tcb_info_json(levels=[fakes.tcb_level("UpToDate", components=(0,) * 15)]),
            "16 sgxtcbcomponents",
        ),
    ],
)
def test_unusable_tcb_info_is_refused(fake_pki: fakes.FakePki, tcb_info: str, reason: str) -> None:
    with pytest.raises(CollateralError, match=reason):
        _verify_fake(fake_pki, tcb_info=tcb_info)


HIGHER = tuple(svn + 1 for svn in fakes.COMPONENT_SVNS[:4]) + fakes.COMPONENT_SVNS[4:]


@pytest.mark.parametrize(
    ("levels", "status", "advisories"),
    [
        # The first level the platform reaches wins, skipping higher ones.
        (
            [
                fakes.tcb_level("UpToDate", components=HIGHER),
                fakes.tcb_level("SWHardeningNeeded", advisories=("SA-1",)),
                fakes.tcb_level("OutOfDate", components=(0,) * 16, advisories=("SA-0",)),
            ],
            "SWHardeningNeeded",
            ("SA-1",),
        ),
        # PCESVN counts as much as the component SVNs.
        (
            [
                fakes.tcb_level("UpToDate", pce_svn=fakes.PCE_SVN + 1),
                fakes.tcb_level("OutOfDate", pce_svn=fakes.PCE_SVN - 1, advisories=("SA-2",)),
            ],
            "OutOfDate",
            ("SA-2",),
        ),
        # Levels are evaluated in descending order whatever order the JSON lists them in.
        (
            [
                fakes.tcb_level("OutOfDate", components=(0,) * 16),
                fakes.tcb_level("ConfigurationNeeded"),
            ],
            "ConfigurationNeeded",
            (),
        ),
    ],
)
def test_tcb_level_selection(
    fake_pki: fakes.FakePki, levels: list[dict[str, Any]], status: str, advisories: tuple[str, ...]
) -> None:
    result = _verify_fake(fake_pki, tcb_info=fakes.tcb_info_json(levels=levels))
    assert (result.tcb_status, result.advisory_ids) == (status, advisories)


def test_platform_below_every_level_is_refused(fake_pki: fakes.FakePki) -> None:
    tcb_info = fakes.tcb_info_json(levels=[fakes.tcb_level("UpToDate", components=HIGHER)])
    with pytest.raises(CollateralError, match="TCB not supported"):
        _verify_fake(fake_pki, tcb_info=tcb_info)


def test_revoked_platform_tcb_is_refused(fake_pki: fakes.FakePki) -> None:
    tcb_info = fakes.tcb_info_json(levels=[fakes.tcb_level("Revoked")])
    with pytest.raises(RevokedError, match="platform"):
        _verify_fake(fake_pki, tcb_info=tcb_info)


def test_out_of_date_qe_is_merged_into_the_status(fake_pki: fakes.FakePki) -> None:
    qe_identity = fakes.qe_identity_json(
        levels=[
            fakes.qe_level(fakes.QE_ISV_SVN + 2, "UpToDate"),
            fakes.qe_level(fakes.QE_ISV_SVN, "OutOfDate", ("SA-QE", "SA-1")),
        ]
    )
    tcb_info = fakes.tcb_info_json(levels=[fakes.tcb_level("ConfigurationNeeded", advisories=("SA-1",))])
    result = _verify_fake(fake_pki, tcb_info=tcb_info, qe_identity=qe_identity)
    assert result.tcb_status == "OutOfDateConfigurationNeeded"
    assert result.advisory_ids == ("SA-1", "SA-QE")


def test_revoked_qe_is_refused(fake_pki: fakes.FakePki) -> None:
    qe_identity = fakes.qe_identity_json(levels=[fakes.qe_level(fakes.QE_ISV_SVN, "Revoked")])
    with pytest.raises(RevokedError, match="QE"):
        _verify_fake(fake_pki, qe_identity=qe_identity)


@pytest.mark.parametrize(
    ("quote_kwargs", "identity_kwargs", "reason"),
    [
        ({"qe_mrsigner": b"\x01" * 32}, {}, "MRSIGNER"),
        ({}, {"isv_prod_id": 2}, "ISVPRODID"),
        ({"qe_isv_svn": 1}, {}, "below every QE identity TCB level"),
    ],
)
def test_qe_identity_mismatch_is_refused(
    fake_pki: fakes.FakePki,
    quote_kwargs: dict[str, Any],
    identity_kwargs: dict[str, Any],
    reason: str,
) -> None:
    quote = fakes.build_quote(fake_pki, **quote_kwargs)
    qe_identity = fakes.qe_identity_json(**identity_kwargs)
    with pytest.raises(CollateralError, match=reason):
        _verify_fake(fake_pki, quote=quote, qe_identity=qe_identity)


def test_qe_attributes_are_compared_under_the_mask(fake_pki: fakes.FakePki) -> None:
    identity = json.loads(fakes.qe_identity_json())
    identity["attributes"] = "13000000000000000000000000000000"  # also demands DEBUG
    with pytest.raises(CollateralError, match="ATTRIBUTES"):
        _verify_fake(fake_pki, qe_identity=json.dumps(identity))
    identity["attributes"] = "11000000000000000000000000000000"
    identity["miscselect"] = "01000000"
    with pytest.raises(CollateralError, match="MISCSELECT"):
        _verify_fake(fake_pki, qe_identity=json.dumps(identity))


@pytest.mark.parametrize(
    ("tcb", "qe", "merged"),
    [
        (UP_TO_DATE, UP_TO_DATE, UP_TO_DATE),
        (SW_HARDENING_NEEDED, UP_TO_DATE, SW_HARDENING_NEEDED),
        (UP_TO_DATE, OUT_OF_DATE, OUT_OF_DATE),
        (SW_HARDENING_NEEDED, OUT_OF_DATE, OUT_OF_DATE),
        (CONFIGURATION_NEEDED, OUT_OF_DATE, OUT_OF_DATE_CONFIGURATION_NEEDED),
        (CONFIGURATION_AND_SW_HARDENING_NEEDED, OUT_OF_DATE, OUT_OF_DATE_CONFIGURATION_NEEDED),
        (OUT_OF_DATE, OUT_OF_DATE, OUT_OF_DATE),
        (OUT_OF_DATE_CONFIGURATION_NEEDED, OUT_OF_DATE, OUT_OF_DATE_CONFIGURATION_NEEDED),
        (UP_TO_DATE, REVOKED, REVOKED),
        (REVOKED, UP_TO_DATE, REVOKED),
    ],
)
def test_merge_tcb_status_follows_qvl(tcb: str, qe: str, merged: str) -> None:
    assert merge_tcb_status(tcb, qe) == merged


def test_every_refusal_is_a_quote_error() -> None:
    for error in (CollateralError, CollateralExpiredError, RevokedError):
        assert issubclass(error, QuoteError)
    assert error("why").reason == "why"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_collateral_mutation_is_refused_or_harmless(
    quote_a: bytes,
    collateral_a_json: dict[str, Any],
    intel_root: ec.EllipticCurvePublicKey,
    data: st.DataObject,
) -> None:
    key = data.draw(st.sampled_from(sorted(collateral_a_json)))
    text: str = collateral_a_json[key]
    index = data.draw(st.integers(0, len(text) - 1))
    char = data.draw(st.sampled_from('0123456789abcdefABCDEF{}[]":, \n-+/=Zz'))
    if char == text[index]:
        return
    forged = dict(collateral_a_json, **{key: text[:index] + char + text[index + 1 :]})
    outcome = fakes.outcome(
        lambda: verify_quote(quote_a, root_public_key=intel_root, collateral=_collateral(forged), now=NOW)
    )
    if isinstance(outcome, QuoteError):
        assert outcome.reason
        return
    # Signed documents admit no change at all, signatures none beyond hex letter case;
    # PEM text may carry slack (e.g. base64 padding bits).
    assert key not in {"tcb_info", "qe_identity"}
    if key.endswith("_signature"):
        assert bytes.fromhex(forged[key]) == bytes.fromhex(text)
    assert outcome.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_a_repeat_verification_reuses_the_checks_but_not_the_verdicts_on_time_or_tampering(
    quote_a: bytes,
    collateral_a: Collateral,
    collateral_a_json: dict[str, Any],
    intel_root: ec.EllipticCurvePublicKey,
) -> None:
    """Parsing and signature checks are memoized by their exact bytes; validity windows are
    judged on every call, and a document changed after a cached success is checked anew."""
    first = verify_quote(quote_a, root_public_key=intel_root, collateral=collateral_a, now=NOW)
    hits = _signed_by.cache_info().hits
    again = verify_quote(quote_a, root_public_key=intel_root, collateral=collateral_a, now=NOW)
    assert _signed_by.cache_info().hits > hits  # the chains were not verified again
    assert (again.tcb_status, again.advisory_ids) == (first.tcb_status, first.advisory_ids)
    with pytest.raises(CollateralExpiredError):  # the same cached documents, a later time
        verify_quote(quote_a, root_public_key=intel_root, collateral=collateral_a, now=AFTER_COLLATERAL)
    forged = dict(
        collateral_a_json,
        tcb_info=collateral_a_json["tcb_info"].replace(
            '"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', 1
        ),
    )
    with pytest.raises(CollateralError, match="TCB info signature"):
        verify_quote(quote_a, root_public_key=intel_root, collateral=_collateral(forged), now=NOW)
    flipped = bytearray(quote_a)
    flipped[-700] ^= 0x01  # inside the PCK leaf certificate
    with pytest.raises(QuoteError):
        verify_quote(bytes(flipped), root_public_key=intel_root, collateral=collateral_a, now=NOW)
