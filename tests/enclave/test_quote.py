"""Sim quotes are real DCAP v3 bytes: the keyvault's verifier accepts them with the dev root and
refuses them with Intel's; a raw-offset parse (independent of any parser) finds the fields."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from tests.enclave.support import Harness
from veil.enclave import wire
from veil.enclave.measurement import measure_source_tree, source_files
from veil.enclave.providers.sim_quote import DEV_MRSIGNER, INTEL_QE_MRSIGNER, SimQuoteProvider
from veil.enclave.runner import PCK_FILES, PCK_KEY_FILE
from veil.services.state.enclave_host import EnclaveCallError
from veil.verify import QuoteError, verify_quote
from veil.verify.roots import intel_root_public_key, load_root_pem

NONCE = hashlib.sha256(b"a verifier's nonce").digest()


def test_sim_quote_verifies_with_the_dev_root_and_has_the_expected_fields(
    harness: Harness, pki_dir: Path, mrenclave: bytes
) -> None:
    quoted = harness.host.get_quote(NONCE)
    verified = verify_quote(quoted.quote, root_public_key=load_root_pem(pki_dir / "sgx-root.pem"))
    assert verified.mrenclave == mrenclave == measure_source_tree()
    assert verified.mrsigner == DEV_MRSIGNER
    assert (verified.isv_prod_id, verified.isv_svn) == (7, 3)
    assert verified.debug is False
    # The enclave quotes its own keys: the runtime data it returns are its public keys.
    assert quoted.runtime_data == harness.keys.SerializeToString(deterministic=True)
    assert verified.report_data == wire.report_data(quoted.runtime_data, NONCE)
    assert verified.report_data[32:] == bytes(32)
    assert verified.quote.signature_data.qe_report.mr_signer == INTEL_QE_MRSIGNER


def test_sim_quote_is_refused_with_the_intel_root(harness: Harness) -> None:
    with pytest.raises(QuoteError, match="pinned root"):
        verify_quote(harness.host.get_quote(NONCE).quote, root_public_key=intel_root_public_key())


@pytest.mark.parametrize(
    ("offset", "what"), [(112, "mrenclave"), (368, "report data"), (436, "ISV signature"), (600, "QE report")]
)
def test_tampered_sim_quote_is_refused(harness: Harness, pki_dir: Path, offset: int, what: str) -> None:
    quote = bytearray(harness.host.get_quote(NONCE).quote)
    quote[offset] ^= 1
    with pytest.raises(QuoteError):
        verify_quote(bytes(quote), root_public_key=load_root_pem(pki_dir / "sgx-root.pem"))


def test_sim_quote_raw_layout(harness: Harness, mrenclave: bytes, pki_dir: Path) -> None:
    quoted = harness.host.get_quote(b"\x01" * 32)
    quote = quoted.quote
    version, key_type, tee_type, _qe_svn, _pce_svn = struct.unpack_from("<HHIHH", quote, 0)
    assert (version, key_type, tee_type) == (3, 2, 0)
    assert quote[12:28].hex() == "939a7233f79c4ca9940a0db3957f0607"
    assert quote[112:144] == mrenclave
    assert quote[176:208] == DEV_MRSIGNER
    assert struct.unpack_from("<HH", quote, 304) == (7, 3)
    assert quote[96] & 0x02 == 0  # DEBUG attribute clear
    assert quote[368:432] == wire.report_data(quoted.runtime_data, b"\x01" * 32)
    (sig_len,) = struct.unpack_from("<I", quote, 432)
    assert sig_len == len(quote) - 436
    auth_size = struct.unpack_from("<H", quote, 1012)[0]
    assert auth_size == 32
    cert_type, cert_size = struct.unpack_from("<HI", quote, 1014 + auth_size)
    assert cert_type == 5
    chain = quote[1020 + auth_size :]
    assert len(chain) == cert_size
    assert chain == b"".join((pki_dir / name).read_bytes() for name in PCK_FILES)


def test_debug_quotes_say_so(pki_dir: Path, mrenclave: bytes) -> None:
    provider = SimQuoteProvider(
        mrenclave=mrenclave,
        pck_chain_pem=b"".join((pki_dir / name).read_bytes() for name in PCK_FILES),
        pck_leaf_key_pem=(pki_dir / PCK_KEY_FILE).read_bytes(),
        debug=True,
    )
    verified = verify_quote(
        provider.quote(bytes(64)), root_public_key=load_root_pem(pki_dir / "sgx-root.pem")
    )
    assert verified.debug is True


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_get_quote_takes_only_a_32_byte_nonce(harness: Harness, size: int) -> None:
    with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT: nonce must be 32 bytes"):
        harness.host.get_quote(bytes(size))


def test_measurement_covers_exactly_the_enclave_sources(tmp_path: Path) -> None:
    measured = source_files()
    assert all(path.suffix == ".py" for path in measured)
    assert {"runtime.py", "dispatcher.py", "sim_quote.py"} <= {path.name for path in measured}
    package = tmp_path / "enclave"
    (package / "tests").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    first = measure_source_tree(package)
    (package / "tests" / "test_x.py").write_text("ignored\n")
    (package / "README.md").write_text("ignored\n")
    assert measure_source_tree(package) == first
    (package / "a.py").write_text("x = 2\n")
    assert measure_source_tree(package) != first
