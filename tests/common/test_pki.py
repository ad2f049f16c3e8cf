"""The dev PKI: SPIFFE identities, key file modes, idempotence and the sim PCK chain."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509

from services.common.identity import spiffe_id_from_pem
from services.common.pki import SGX_EXTENSION_OID, PkiExistsError, init_pki


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
