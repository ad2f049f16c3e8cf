"""The dev PKI: SPIFFE identities, key file modes, idempotence, the sim PCK chain and its collateral."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509

from veil.dev.pki import (
    SGX_EXTENSION_OID,
    SIM_FMSPC,
    SIM_QE_ISV_SVN,
    PkiExistsError,
    collateral_dir,
    ensure_sim_collateral,
    init_pki,
    sim_collateral_path,
)
from veil.enclave.providers.sim_quote import SimQuoteProvider
from veil.enclave.runner import PCK_FILES
from veil.services.common.identity import spiffe_id_from_pem
from veil.services.keyvault.collateral_files import CollateralFiles, collateral_file_name
from veil.verify import CollateralError, verify_quote
from veil.verify.collateral import load_collateral, parse_qe_identity, parse_tcb_info
from veil.verify.roots import load_root_pem


def test_each_service_certificate_carries_its_spiffe_id(pki_dir: Path) -> None:
    for name in ("keyvault", "state", "gateway", "admin"):
        assert spiffe_id_from_pem((pki_dir / f"{name}.pem").read_bytes()) == f"spiffe://veil/{name}"


def test_private_keys_are_owner_only(pki_dir: Path) -> None:
    for key in pki_dir.glob("*-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    init_pki(tmp_path, now=now)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(PkiExistsError):
        init_pki(tmp_path, now=now)
    assert (tmp_path / "ca.pem").read_bytes() == before
    init_pki(tmp_path, force=True, now=now)
    assert (tmp_path / "ca.pem").read_bytes() != before


def test_sim_pck_chain_links_to_the_dev_root(pki_dir: Path) -> None:
    root = x509.load_pem_x509_certificate((pki_dir / "sgx-root.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((pki_dir / "sgx-pck-ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((pki_dir / "sgx-pck-leaf.pem").read_bytes())
    ca.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(ca)
    assert "SGX PCK Certificate" in leaf.subject.rfc4514_string()
    assert leaf.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value is not None


def _sim_quote(pki_dir: Path, *, qe_svn: int | None = None) -> bytes:
    """A sim quote as the enclave runner makes it (by default, the provider's own QE SVN)."""
    chain = b"".join((pki_dir / name).read_bytes() for name in PCK_FILES)
    key = (pki_dir / "sgx-pck-leaf-key.pem").read_bytes()
    if qe_svn is None:
        provider = SimQuoteProvider(mrenclave=b"\x01" * 32, pck_chain_pem=chain, pck_leaf_key_pem=key)
    else:
        provider = SimQuoteProvider(
            mrenclave=b"\x01" * 32, pck_chain_pem=chain, pck_leaf_key_pem=key, qe_svn=qe_svn
        )
    return provider.quote(b"\x02" * 64)


def test_dev_collateral_makes_a_sim_quote_up_to_date(pki_dir: Path) -> None:
    path = sim_collateral_path(pki_dir)
    assert path == collateral_dir(pki_dir) / collateral_file_name(SIM_FMSPC)
    root = load_root_pem(pki_dir / "sgx-root.pem")
    quote = _sim_quote(pki_dir)
    verified = verify_quote(quote, root_public_key=root, collateral=load_collateral(path))
    assert (verified.tcb_status, verified.advisory_ids) == ("UpToDate", ())
    # The same quote without collateral: signatures, chain and Intel's QE identity, no TCB verdict.
    assert verify_quote(quote, root_public_key=root).tcb_status is None
    # Through the keyvault's file provider, as `veil up` configures it.
    assert (
        verify_quote(
            quote, root_public_key=root, collateral=CollateralFiles(collateral_dir(pki_dir))(quote)
        ).tcb_status
        == "UpToDate"
    )


def test_dev_collateral_lasts_as_long_as_the_dev_root(pki_dir: Path) -> None:
    root_cert = x509.load_pem_x509_certificate((pki_dir / "sgx-root.pem").read_bytes())
    collateral = load_collateral(sim_collateral_path(pki_dir))
    tcb_info = parse_tcb_info(collateral.tcb_info)
    qe_identity = parse_qe_identity(collateral.qe_identity)
    assert tcb_info.next_update == qe_identity.next_update
    assert abs(tcb_info.next_update - root_cert.not_valid_after_utc) < dt.timedelta(seconds=1)
    assert tcb_info.next_update - tcb_info.issue_date > dt.timedelta(days=3649)
    root = load_root_pem(pki_dir / "sgx-root.pem")
    late = tcb_info.next_update - dt.timedelta(days=1)
    verified = verify_quote(_sim_quote(pki_dir), root_public_key=root, collateral=collateral, now=late)
    assert verified.tcb_status == "UpToDate"


def test_a_sim_qe_below_the_dev_qe_identity_is_refused(pki_dir: Path) -> None:
    collateral = load_collateral(sim_collateral_path(pki_dir))
    with pytest.raises(CollateralError, match="below every QE identity TCB level"):
        verify_quote(
            _sim_quote(pki_dir, qe_svn=SIM_QE_ISV_SVN - 1),
            root_public_key=load_root_pem(pki_dir / "sgx-root.pem"),
            collateral=collateral,
        )


def test_a_pki_without_collateral_gets_a_new_sim_chain_with_collateral(tmp_path: Path) -> None:
    init_pki(tmp_path)
    assert ensure_sim_collateral(tmp_path) == []  # already there: nothing changes
    ca, root = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "sgx-root.pem").read_bytes()
    shutil.rmtree(collateral_dir(tmp_path))  # a dev PKI from before dev collateral
    written = ensure_sim_collateral(tmp_path)
    assert sim_collateral_path(tmp_path) in written
    assert (tmp_path / "ca.pem").read_bytes() == ca  # the mTLS identities stay
    assert (tmp_path / "sgx-root.pem").read_bytes() != root  # collateral needs the root's key
    assert stat.S_IMODE((tmp_path / "sgx-pck-leaf-key.pem").stat().st_mode) == 0o600
    verified = verify_quote(
        _sim_quote(tmp_path),
        root_public_key=load_root_pem(tmp_path / "sgx-root.pem"),
        collateral=load_collateral(sim_collateral_path(tmp_path)),
    )
    assert verified.tcb_status == "UpToDate"
