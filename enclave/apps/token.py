"""token: confidential balances.

Only the holder of the issuer's Ed25519 key (InstanceConfig.token_issuer_public_key) mints,
so the instance must use AUTH_SCHEME_SIGNATURE. Transfers never overdraw, a caller reads only
its own balance, and anyone may read the total supply. Zero balances are not stored.
"""

from __future__ import annotations

from collections.abc import Mapping

from veil.enclave.apps.base import App, CallContext, Handler, check_name
from veil.enclave.errors import FAILED_PRECONDITION, INVALID_ARGUMENT, PERMISSION_DENIED, EnclaveError
from veil.enclave.store import Store
from veil.enclave.v1 import apps_pb2, envelope_pb2

_MAX = 2**64 - 1
_SUPPLY = ("token", "supply")


def _balance_key(account: str) -> tuple[str, ...]:
    return ("token", "balance", account)


def _read(store: Store, key: tuple[str, ...]) -> int:
    raw = store.get(key)
    return 0 if raw is None else int.from_bytes(raw, "big")


def _write(store: Store, key: tuple[str, ...], amount: int) -> None:
    if amount:
        store.put(key, amount.to_bytes(8, "big"))
    else:
        store.delete(key)


def _positive(amount: int) -> None:
    if amount <= 0:
        raise EnclaveError(INVALID_ARGUMENT, "amount must be positive")


class TokenApp(App):
    """Confidential balances with a single issuer."""

    kind = envelope_pb2.APP_KIND_TOKEN
    field = "token"
    read_only = frozenset({"balance", "total_supply"})

    def validate_config(self, config: envelope_pb2.InstanceConfig) -> None:
        if len(config.token_issuer_public_key) != 32:
            raise EnclaveError(INVALID_ARGUMENT, "token app needs a 32-byte Ed25519 token_issuer_public_key")
        if config.auth_scheme != envelope_pb2.AUTH_SCHEME_SIGNATURE:
            raise EnclaveError(INVALID_ARGUMENT, "token app requires AUTH_SCHEME_SIGNATURE (mint is signed)")

    def methods(self) -> Mapping[str, Handler]:
        return {
            "mint": self.mint,
            "transfer": self.transfer,
            "balance": self.balance,
            "total_supply": self.total_supply,
        }

    def mint(self, context: CallContext, request: apps_pb2.TokenMint) -> apps_pb2.TokenAmount:
        """Create tokens for `to`; issuer only. Returns the new total supply."""
        if context.caller.signer_public_key != context.config.token_issuer_public_key:
            raise EnclaveError(PERMISSION_DENIED, "only the issuer mints")
        check_name(request.to, "to")
        _positive(request.amount)
        supply = _read(context.store, _SUPPLY) + request.amount
        if supply > _MAX:
            raise EnclaveError(FAILED_PRECONDITION, "total supply would overflow")
        _write(context.store, _SUPPLY, supply)
        key = _balance_key(request.to)
        _write(context.store, key, _read(context.store, key) + request.amount)
        return apps_pb2.TokenAmount(amount=supply)

    def transfer(self, context: CallContext, request: apps_pb2.TokenTransfer) -> apps_pb2.TokenAmount:
        """Move tokens from the caller to `to`. Returns the caller's balance after."""
        check_name(request.to, "to")
        _positive(request.amount)
        source = _balance_key(context.caller.account)
        balance = _read(context.store, source)
        if request.amount > balance:
            raise EnclaveError(FAILED_PRECONDITION, "insufficient balance")
        if request.to != context.caller.account:
            _write(context.store, source, balance - request.amount)
            target = _balance_key(request.to)
            _write(context.store, target, _read(context.store, target) + request.amount)
        return apps_pb2.TokenAmount(amount=_read(context.store, source))

    def balance(self, context: CallContext, request: apps_pb2.TokenBalance) -> apps_pb2.TokenAmount:
        """The caller's own balance."""
        return apps_pb2.TokenAmount(amount=_read(context.store, _balance_key(context.caller.account)))

    def total_supply(self, context: CallContext, request: apps_pb2.TokenTotalSupply) -> apps_pb2.TokenAmount:
        """The total supply."""
        return apps_pb2.TokenAmount(amount=_read(context.store, _SUPPLY))
