"""Where the real SGX quote vectors live: ``<repo>/../shared/testdata/sgx-quotes``.

The shared test data sits beside the repository (also in CI). A missing file is an error,
never a skip: a verifier test that silently does not run proves nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SGX_TESTDATA = REPO_ROOT.parent / "shared" / "testdata" / "sgx-quotes"

QUOTE_A = "dcap-qvl_sgx_quote.bin"
QUOTE_B = "mobilecoin_hw_quote.dat"
QUOTE_C = "azure-sdk_sgx_quote.bin"
QUOTE_D = "occlum-sgx-quote_quote.raw"
COLLATERAL_A = "dcap-qvl_sgx_quote_collateral.json"
RUNTIME_DATA_C = "azure-sdk_runtime_data.bin"
ALL_QUOTES = (QUOTE_A, QUOTE_B, QUOTE_C, QUOTE_D)
#: What quote A proves, as `veil attest verify` prints it (VerifiedQuote.to_json_dict).
QUOTE_A_FACTS = {
    "mrenclave": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
    "mrsigner": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
    "isv_prod_id": 0,
    "isv_svn": 0,
    "debug": False,
    "report_data": (b"Hello, world!" + bytes(51)).hex(),
}

#: Inside every vector's PCK chain validity (latest notBefore 2023-09-20, earliest notAfter
#: 2028-04-21) and inside quote A's collateral window (2025-06-19T10:56:11Z to
#: 2025-07-19T10:01:18Z, the earliest nextUpdate being the QE identity's).
NOW = datetime(2025, 7, 1, tzinfo=UTC)
#: After every nextUpdate of quote A's collateral (TCB info: 2025-07-19T10:56:11Z).
AFTER_COLLATERAL = datetime(2025, 7, 20, tzinfo=UTC)


def vector_path(name: str) -> Path:
    """Path of a shared test vector; fails the test loudly when it is missing."""
    path = SGX_TESTDATA / name
    if not path.is_file():
        pytest.fail(f"missing SGX test vector {path} (shared/ must sit beside the repo)")
    return path
