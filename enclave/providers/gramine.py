"""Quote and sealing providers for Gramine-SGX, over its `/dev/attestation` pseudo-files.

Under `gramine-sgx`, writing 64 bytes to `user_report_data` and then reading `quote` yields a
DCAP quote of this enclave from the platform's quoting enclave; `my_target_info` starts with
this enclave's MRENCLAVE; `keys/_sgx_mrenclave` is the 16-byte SGX sealing key bound to
MRENCLAVE and this CPU. The root path is injectable so tests can use a fake file tree.

NOT RUN ON SGX HARDWARE HERE: these providers are unit-tested against a fake file tree only.
"""

from __future__ import annotations

from pathlib import Path

from veil.enclave import crypto
from veil.enclave.providers.sealing import KeySealer
from veil.enclave.wire import REPORT_DATA_SIZE

DEFAULT_ROOT = Path("/dev/attestation")
_SEAL_INFO = b"veil/seal/v1/gramine"


class GramineQuoteProvider:
    """DCAP quotes through Gramine's attestation pseudo-files."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self._root = root
        kind = (root / "attestation_type").read_text().strip()
        if kind != "dcap":
            raise RuntimeError(f"Gramine attestation type is {kind!r}; Veil needs 'dcap'")

    def quote(self, report_data: bytes) -> bytes:
        """Ask the platform's quoting enclave for a quote over `report_data`."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError("report data must be 64 bytes")
        (self._root / "user_report_data").write_bytes(report_data)
        return (self._root / "quote").read_bytes()

    def mrenclave(self) -> bytes:
        """This enclave's measurement (the first 32 bytes of its TARGETINFO)."""
        target_info = (self._root / "my_target_info").read_bytes()
        if len(target_info) < 32:
            raise RuntimeError("my_target_info is too short")
        return target_info[:32]


class GramineSealingProvider(KeySealer):
    """Sealing under the SGX MRENCLAVE-policy sealing key Gramine exposes."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        sgx_key = (root / "keys" / "_sgx_mrenclave").read_bytes()
        if len(sgx_key) != 16:
            raise RuntimeError("the SGX sealing key must be 16 bytes")
        super().__init__(crypto.hkdf_sha256(sgx_key, _SEAL_INFO))
