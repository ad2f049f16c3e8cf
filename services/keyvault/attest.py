"""The Attest flow: verify a DCAP quote, check what it binds, issue an attestation token, audit it.

1. Bounds: quote at most 64 KiB, runtime data 1..16 KiB, nonce exactly 32 bytes.
2. ``verify_quote`` against the configured root (Intel for production, the dev root for
   sim), at the injected clock's time, with collateral when a provider supplies it.
3. Binding: ``report_data == wire.report_data(runtime_data, nonce)`` (a domain-separated
   hash of both, then 32 zero bytes), which only the enclave computes: GetQuote takes just
   the nonce, so a quote vouches only for the enclave's own keys.
4. The runtime data must be a canonical ``veil.enclave.v1.EnclavePublicKeys`` with an
   X25519 HPKE key and an Ed25519 signing key (a token is only useful if it names them).
5. The enclave must pin *this* keyvault's release-signing key
   (``keyvault_release_public_key``); otherwise it is refused with reason
   ``RELEASE_KEY_MISMATCH``. An enclave pinned to another key accepts data keys from
   whoever holds that key (say, the host), so no token may vouch for it.
6. Issue the token (claims in :mod:`veil.services.keyvault.tokens`) and audit the outcome.

Whether the enclave is *acceptable* (measurement, debug, TCB status) is not decided here:
the token states facts, and each key's release policy decides at release time -- for
instance keys together with the operator enclave policy, which also decides who may advance
commit heads (:mod:`veil.services.keyvault.enclave_policy`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec

from veil.enclave import wire
from veil.services.keyvault.audit import (
    ACTION_ATTEST,
    OUTCOME_ALLOWED,
    AuditLog,
    DetailValue,
)
from veil.services.keyvault.clock import Clock
from veil.services.keyvault.enclave_keys import ED25519_KEY_SIZE, check_report_data, parse_runtime_data
from veil.services.keyvault.errors import AttestationRefusedError, InvalidArgumentError
from veil.services.keyvault.tokens import IssuedToken, TokenIssuer
from veil.verify import QuoteError, verify_quote
from veil.verify.collateral import Collateral

MAX_QUOTE_BYTES = 64 * 1024
MAX_RUNTIME_DATA_BYTES = 16 * 1024
NONCE_BYTES = wire.REPORT_NONCE_SIZE

#: Supplies collateral for a quote (e.g. from a PCCS cache), or None to verify without it.
CollateralProvider = Callable[[bytes], Collateral | None]


@dataclass(frozen=True)
class Attestor:
    """Turns verified evidence into attestation tokens."""

    issuer: TokenIssuer
    audit: AuditLog
    clock: Clock
    _: KW_ONLY
    root_public_key: ec.EllipticCurvePublicKey
    release_public_key: bytes
    collateral: CollateralProvider | None = None

    def __post_init__(self) -> None:
        if len(self.release_public_key) != ED25519_KEY_SIZE:
            raise ValueError("release_public_key must be a 32-byte Ed25519 public key")

    def attest(self, quote: bytes, runtime_data: bytes, nonce: bytes, *, caller: str) -> IssuedToken:
        """Verify the evidence and return a token; every outcome is audited."""
        detail: dict[str, DetailValue] = {"quote_hash": hashlib.sha256(quote).hexdigest()}
        try:
            _check_sizes(quote, runtime_data, nonce)
            collateral = self.collateral(quote) if self.collateral is not None else None
            try:
                verified = verify_quote(
                    quote,
                    root_public_key=self.root_public_key,
                    collateral=collateral,
                    now=datetime.fromtimestamp(self.clock(), UTC),
                )
            except QuoteError as exc:
                raise AttestationRefusedError(
                    f"quote refused: {exc.reason}", reason="QUOTE_INVALID"
                ) from None
            detail.update(
                {
                    "mrenclave": verified.mrenclave.hex(),
                    "mrsigner": verified.mrsigner.hex(),
                    "product_id": verified.isv_prod_id,
                    "svn": verified.isv_svn,
                    "debuggable": verified.debug,
                    "tcb_status": verified.tcb_status,
                    "advisory_ids": list(verified.advisory_ids),
                }
            )
            check_report_data(verified.report_data, runtime_data, nonce)
            enclave = parse_runtime_data(runtime_data)
            pinned = enclave.keyvault_release_public_bytes
            detail["keyvault_release_public_key"] = pinned.hex()
            if pinned != self.release_public_key:
                raise AttestationRefusedError(
                    "enclave pins another keyvault release key, so it would accept keys this "
                    "keyvault did not release",
                    reason="RELEASE_KEY_MISMATCH",
                )
            issued = self.issuer.issue(
                verified, runtime_data=runtime_data, nonce=nonce, quote_hash=hashlib.sha256(quote).digest()
            )
            detail.update({"jti": issued.jti, "kid": issued.kid, "expires_at": issued.expires_at})
            self.audit.record(action=ACTION_ATTEST, outcome=OUTCOME_ALLOWED, caller=caller, detail=detail)
            return issued
        except Exception as exc:
            self.audit.record_refusal(action=ACTION_ATTEST, caller=caller, detail=detail, refusal=exc)
            raise


def _check_sizes(quote: bytes, runtime_data: bytes, nonce: bytes) -> None:
    if not 0 < len(quote) <= MAX_QUOTE_BYTES:
        raise InvalidArgumentError(f"quote must be 1..{MAX_QUOTE_BYTES} bytes")
    if not 0 < len(runtime_data) <= MAX_RUNTIME_DATA_BYTES:
        raise InvalidArgumentError(f"runtime_data must be 1..{MAX_RUNTIME_DATA_BYTES} bytes")
    if len(nonce) != NONCE_BYTES:
        raise InvalidArgumentError(f"nonce must be {NONCE_BYTES} bytes")
