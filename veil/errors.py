"""Every error a Veil client sees, in one place.

`VeilClientError` is the base of everything the SDK raises (its subclasses name one kind
each). Refused evidence is the verification library's own family: `AttestationError` and its
subclasses (a quote, its collateral, a token, a report-data binding); nothing is ever sent to
an enclave that raised one. Catch both to catch every failure:

    try:
        ...
    except (veil.errors.VeilClientError, veil.errors.AttestationError) as error:
        ...

Its names are those of `veil.sdk.errors` and `veil.verify.errors` (each module's `__all__`).
"""

from __future__ import annotations

from veil.sdk import errors as _sdk_errors
from veil.sdk.errors import *  # noqa: F403
from veil.verify import errors as _verify_errors
from veil.verify.errors import *  # noqa: F403

__all__ = _sdk_errors.__all__ + _verify_errors.__all__
