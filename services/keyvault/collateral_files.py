"""Quote collateral from a directory of files, one per platform: ``<dir>/<fmspc>.json``.

``VEIL_KEYVAULT_COLLATERAL_DIR`` names the directory; each file is the dcap-qvl JSON collateral
(:meth:`Collateral.from_json`) of the platforms whose PCK certificate carries that FMSPC (12
lowercase hex digits). For every quote the FMSPC is read from its PCK leaf's SGX extension and
the matching file is used; the verifier then authenticates it against the pinned root, so the
files need no protection beyond availability.

- At start-up every ``*.json`` file is read and must be valid collateral for the FMSPC its
  name says: a bad file stops the keyvault (fail loudly, not at the first quote).
- A file is re-read when its mtime or size changes (fresh collateral needs no restart); one
  that has become invalid refuses the quotes of its platform until it is fixed.
- **No file for a quote's FMSPC refuses the quote** (fail closed): an operator who configured
  collateral expects every token's TCB status to be evaluated, and an "Unevaluated" token for
  a platform nobody provisioned would pass any policy that accepts "Unevaluated".

A refusal is the Attestor's own: ``AttestationRefusedError`` ``QUOTE_INVALID`` "quote refused: ...".

Without a directory, quotes are verified without collateral and tokens say "Unevaluated".
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from veil.services.common.config import ConfigError
from veil.services.keyvault.config import ENV_KEYVAULT_COLLATERAL_DIR
from veil.services.keyvault.errors import AttestationRefusedError
from veil.verify.collateral import Collateral, parse_qe_identity, parse_tcb_info
from veil.verify.errors import CollateralError, QuoteError
from veil.verify.pck import parse_pem_chain, parse_sgx_extension
from veil.verify.quote import parse_quote

_FILE_NAME = re.compile(r"[0-9a-f]{12}\.json\Z")

_log = logging.getLogger(__name__)


def collateral_file_name(fmspc: bytes) -> str:
    """The file that holds the collateral of a platform: ``<fmspc lowercase hex>.json``."""
    return f"{fmspc.hex()}.json"


def quote_fmspc(quote: bytes) -> bytes:
    """The FMSPC in a quote's PCK leaf certificate (unverified: only chooses the collateral)."""
    cert_data = parse_quote(quote).signature_data.cert_data
    return parse_sgx_extension(parse_pem_chain(cert_data, "PCK chain")[0]).fmspc


def read_collateral_file(path: Path, fmspc: bytes) -> Collateral:
    """Read and parse one file; CollateralError if it is not collateral for ``fmspc``.

    Only the form is checked here; signatures, chains, CRLs and freshness are verified with
    each quote against the pinned root.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CollateralError(f"collateral file {path} is unreadable: {exc.strerror or exc}") from None
    try:
        collateral = Collateral.from_json(data)
        tcb_info = parse_tcb_info(collateral.tcb_info)
        parse_qe_identity(collateral.qe_identity)
    except CollateralError as exc:
        raise CollateralError(f"collateral file {path} is invalid: {exc.reason}") from None
    if tcb_info.fmspc != fmspc:
        raise CollateralError(
            f"collateral file {path} holds TCB info for FMSPC {tcb_info.fmspc.hex()}, not {fmspc.hex()}"
        )
    return collateral


class CollateralFiles:
    """A :data:`~veil.services.keyvault.attest.CollateralProvider` over ``<dir>/<fmspc>.json``."""

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise ConfigError(f"{ENV_KEYVAULT_COLLATERAL_DIR}: {directory} is not a directory")
        self._directory = directory.absolute()
        self._cache: dict[bytes, tuple[tuple[int, int], Collateral]] = {}
        self._lock = threading.Lock()  # handlers run on a thread pool
        for path in sorted(self._directory.iterdir()):
            if path.suffix != ".json":
                continue
            if not _FILE_NAME.match(path.name):
                raise ConfigError(
                    f"{ENV_KEYVAULT_COLLATERAL_DIR}: {path.name} is not named <fmspc>.json "
                    "(12 lowercase hex digits)"
                )
            try:
                self._load(bytes.fromhex(path.stem))
            except QuoteError as exc:
                raise ConfigError(f"{ENV_KEYVAULT_COLLATERAL_DIR}: {exc.reason}") from None
        if not self._cache:
            _log.warning("%s has no collateral files: every quote will be refused", self._directory)

    @property
    def source(self) -> str:
        """Where collateral comes from, as ``GetStatus.collateral_source`` reports it."""
        return f"files:{self._directory}"

    @property
    def platforms(self) -> tuple[bytes, ...]:
        """The FMSPCs with a loaded file."""
        with self._lock:
            return tuple(sorted(self._cache))

    def __call__(self, quote: bytes) -> Collateral:
        """The collateral for the quote's platform; AttestationRefusedError if none or invalid."""
        try:
            fmspc = quote_fmspc(quote)
        except QuoteError as exc:
            raise AttestationRefusedError(f"quote refused: {exc.reason}", reason="QUOTE_INVALID") from None
        try:
            return self._load(fmspc)
        except CollateralError as exc:
            _log.error("collateral for FMSPC %s: %s", fmspc.hex(), exc.reason)
            raise AttestationRefusedError(f"quote refused: {exc.reason}", reason="QUOTE_INVALID") from None

    def _load(self, fmspc: bytes) -> Collateral:
        path = self._directory / collateral_file_name(fmspc)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CollateralError(
                f"no collateral for this platform (FMSPC {fmspc.hex()}): {path} does not exist, "
                "and a keyvault configured with collateral does not issue unevaluated tokens"
            ) from None
        except OSError as exc:
            raise CollateralError(f"collateral file {path} is unreadable: {exc.strerror or exc}") from None
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(fmspc)
        if cached is not None and cached[0] == version:
            return cached[1]
        collateral = read_collateral_file(path, fmspc)
        with self._lock:
            self._cache[fmspc] = (version, collateral)
        if cached is not None:
            _log.info("reloaded collateral for FMSPC %s from %s", fmspc.hex(), path)
        return collateral
