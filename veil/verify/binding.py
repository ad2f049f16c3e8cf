"""Report-data binding: what an enclave's quote must carry for its runtime data and a nonce.

The enclave computes its report data itself (``veil.enclave.wire.report_data``): a
domain-separated SHA-256 over its own public keys (the runtime data) and a 32-byte nonce,
followed by 32 zero bytes. The keyvault checks it before issuing a token, and again before
trusting the keys a token names.
"""

from __future__ import annotations

import secrets

from veil.enclave import wire
from veil.verify.errors import BindingError


def expected_report_data(runtime_data: bytes, nonce: bytes) -> bytes:
    """The report data an enclave quotes for its runtime data and a 32-byte nonce (wire.report_data)."""
    try:
        return wire.report_data(runtime_data, nonce)
    except ValueError as exc:
        raise BindingError(str(exc)) from None


def check_report_data(report_data: bytes, runtime_data: bytes, nonce: bytes) -> None:
    """Raise :class:`BindingError` unless ``report_data`` binds ``runtime_data`` and ``nonce``."""
    expected = expected_report_data(runtime_data, nonce)
    if len(report_data) != 64 or not secrets.compare_digest(report_data[:32], expected[:32]):
        raise BindingError("report data does not bind the runtime data and nonce")
    if report_data[32:] != bytes(32):
        raise BindingError("report data bytes 32..63 must be zero")
