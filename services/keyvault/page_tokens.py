"""Page tokens of the keyvault's listings: where the next page starts, tagged with the listing's
format, URL-safe base64 without padding. Opaque to callers, checked on the way back in."""

from __future__ import annotations

import base64

from veil.services.keyvault.errors import InvalidArgumentError


def encode(prefix: str, position: str) -> str:
    """The token of the page after `position` in the listing tagged `prefix`."""
    raw = f"{prefix}{position}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode(prefix: str, token: str) -> str:
    """The position a token names ("" for no token); INVALID_ARGUMENT for one not made by
    `encode` with this `prefix`."""
    if not token:
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError):
        raise InvalidArgumentError("invalid page_token") from None
    if not text.startswith(prefix):
        raise InvalidArgumentError("invalid page_token")
    return text[len(prefix) :]
