"""The Gramine providers against a fake /dev/attestation tree (NOT run on SGX hardware here)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from veil.enclave.errors import DecryptionError
from veil.enclave.providers.gramine import GramineQuoteProvider, GramineSealingProvider
from veil.enclave.runner import RunnerOptions, build_enclave


class FakeAttestation:
    """A fake /dev/attestation: `quote` echoes the last report data, like a loopback QE."""

    def __init__(self, root: Path, mrenclave: bytes) -> None:
        self.root = root
        (root / "keys").mkdir(parents=True)
        (root / "attestation_type").write_text("dcap\n")
        (root / "my_target_info").write_bytes(mrenclave + bytes(480))
        (root / "keys" / "_sgx_mrenclave").write_bytes(secrets.token_bytes(16))

    def sync_quote(self) -> None:
        data = (self.root / "user_report_data").read_bytes()
        (self.root / "quote").write_bytes(b"QUOTE:" + data)


@pytest.fixture
def fake(tmp_path: Path) -> FakeAttestation:
    return FakeAttestation(tmp_path / "attestation", b"\xaa" * 32)


def test_quote_provider_writes_report_data_and_reads_the_quote(fake: FakeAttestation) -> None:
    provider = GramineQuoteProvider(fake.root)
    assert provider.mrenclave() == b"\xaa" * 32
    (fake.root / "quote").write_bytes(b"stale")
    report_data = secrets.token_bytes(64)
    provider.quote(report_data)
    assert (fake.root / "user_report_data").read_bytes() == report_data
    fake.sync_quote()
    assert provider.quote(report_data) == b"QUOTE:" + report_data
    with pytest.raises(ValueError, match="64 bytes"):
        provider.quote(b"short")


def test_quote_provider_refuses_non_dcap_attestation(fake: FakeAttestation) -> None:
    (fake.root / "attestation_type").write_text("none\n")
    with pytest.raises(RuntimeError, match="dcap"):
        GramineQuoteProvider(fake.root)


def test_sealing_provider_binds_to_the_sgx_sealing_key(fake: FakeAttestation, tmp_path: Path) -> None:
    blob = GramineSealingProvider(fake.root).seal(b"keys", b"aad")
    assert GramineSealingProvider(fake.root).unseal(blob, b"aad") == b"keys"
    with pytest.raises(DecryptionError):
        GramineSealingProvider(fake.root).unseal(blob, b"other aad")
    other = FakeAttestation(tmp_path / "other-cpu", b"\xaa" * 32)
    with pytest.raises(DecryptionError):
        GramineSealingProvider(other.root).unseal(blob, b"aad")
    (fake.root / "keys" / "_sgx_mrenclave").write_bytes(b"short")
    with pytest.raises(RuntimeError, match="16 bytes"):
        GramineSealingProvider(fake.root)


def test_runner_builds_a_gramine_enclave_from_the_fake_tree(fake: FakeAttestation) -> None:
    enclave = build_enclave(
        RunnerOptions(quote_provider="gramine", seal_provider="gramine", gramine_root=fake.root)
    )
    assert enclave.mrenclave == b"\xaa" * 32


def test_manifest_template_and_readme_exist() -> None:
    gramine_dir = Path(__file__).resolve().parents[2] / "enclave" / "gramine"
    manifest = (gramine_dir / "veil-enclave.manifest.template").read_text()
    assert 'sgx.remote_attestation = "dcap"' in manifest
    assert '"-m", "veil.enclave.runner"' in manifest
    assert "not run on sgx hardware" in (gramine_dir / "README.md").read_text().lower()
