"""Platform services the enclave depends on: quoting and sealing.

Each has a `sim` implementation (dev PKI, platform secret file) and a `gramine` one
(`/dev/attestation/*` under Gramine-SGX). The runner picks them from explicit flags; there is
no default, so a misconfigured production deployment fails closed.
"""

from __future__ import annotations

from typing import Protocol


class QuoteProvider(Protocol):
    """Produces DCAP quotes of this enclave."""

    def quote(self, report_data: bytes) -> bytes:
        """A DCAP ECDSA quote v3 whose report data is `report_data` (exactly 64 bytes)."""
        ...


class SealingProvider(Protocol):
    """Encrypts data to this platform and this enclave measurement."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal `plaintext`, authenticating `aad`."""
        ...

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """Open a sealed blob, or raise DecryptionError."""
        ...
