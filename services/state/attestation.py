"""Attesting the enclave at the keyvault and keeping its attestation token fresh.

The host hands the enclave only a fresh 32-byte nonce; the enclave quotes
``wire.report_data(runtime_data, nonce)`` over its own public keys (EnclavePublicKeys,
serialized deterministically, returned as runtime_data), so the host cannot choose what a
quote covers. The keyvault checks that binding and returns a short-lived token naming the keys.
Tokens serve two uses with different rules at the keyvault: a key release consumes its
token (one release per token, so `fresh()` attests anew each time), while commit-head
advances may reuse one until it nears expiry (`current()`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from veil.enclave.v1 import envelope_pb2
from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.keyvault_client import KeyvaultClient

NONCE_SIZE = 32
REFRESH_MARGIN_S = 60.0


@dataclass(frozen=True)
class Attestation:
    """One verified attestation: the evidence and the token the keyvault issued for it."""

    quote: bytes
    runtime_data: bytes
    nonce: bytes
    token: str
    expires_at: float  # Unix seconds
    keys: envelope_pb2.EnclavePublicKeys

    @property
    def issuer(self) -> str:
        """The token's `iss` (release policies name it as their authority); read, not verified."""
        claims = jwt.decode(self.token, options={"verify_signature": False})
        return str(claims.get("iss", ""))


class Attestor:
    """Attests one enclave; thread-safe."""

    def __init__(
        self,
        enclave: EnclaveHost,
        keyvault: KeyvaultClient,
        keys: envelope_pb2.EnclavePublicKeys,
        *,
        clock: Callable[[], float] = time.time,
        refresh_margin_s: float = REFRESH_MARGIN_S,
    ) -> None:
        self._enclave = enclave
        self._keyvault = keyvault
        self._keys = keys
        self._runtime_data = keys.SerializeToString(deterministic=True)
        self._clock = clock
        self._margin = refresh_margin_s
        self._lock = threading.Lock()
        self._current: Attestation | None = None

    def fresh(self) -> Attestation:
        """A new attestation (new nonce, new quote, new token); it becomes the current one."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        quoted = self._enclave.get_quote(nonce)
        if quoted.runtime_data != self._runtime_data:
            raise RuntimeError("the enclave quoted other keys than it published at Initialize")
        quote = quoted.quote
        response = self._keyvault.attest(quote, self._runtime_data, nonce)
        expires_at = response.expire_time.seconds + response.expire_time.nanos / 1e9
        if not response.HasField("expire_time"):
            expires_at = self._clock() + 2 * self._margin  # unknown lifetime: refresh soon
        attestation = Attestation(quote, self._runtime_data, nonce, response.token, expires_at, self._keys)
        with self._lock:
            self._current = attestation
        return attestation

    def last(self) -> Attestation:
        """The latest attestation as is, without contacting the keyvault."""
        with self._lock:
            attestation = self._current
        if attestation is None:
            raise RuntimeError("not attested yet")
        return attestation

    def current(self) -> Attestation:
        """The current attestation, renewed when it is missing or within the margin of expiry."""
        with self._lock:
            attestation = self._current
        if attestation is None or attestation.expires_at - self._clock() < self._margin:
            return self.fresh()
        return attestation
