"""`veil.errors` names every error a client can see (a new user could not import ForeignAnswer
and NotSettledYet, which the SDK README tells them to handle): each VeilClientError class the
SDK defines is in `veil.sdk.errors.__all__`, so in `veil.errors`."""

from __future__ import annotations

import inspect

import veil.errors
from veil.sdk import errors as sdk_errors


def test_every_sdk_error_is_exported_by_veil_errors() -> None:
    defined = {
        name
        for name, value in inspect.getmembers(sdk_errors, inspect.isclass)
        if issubclass(value, sdk_errors.VeilClientError) and value.__module__ == sdk_errors.__name__
    }
    assert defined <= set(sdk_errors.__all__), defined - set(sdk_errors.__all__)
    for name in defined:
        assert getattr(veil.errors, name) is getattr(sdk_errors, name)
