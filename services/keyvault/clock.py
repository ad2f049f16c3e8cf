"""The keyvault's notion of time: an injectable clock returning POSIX seconds.

Every time-dependent decision (token lifetimes, jti retention, audit timestamps,
signing-key retirement) reads a :data:`Clock` passed in by the caller, so tests can
freeze or move time instead of sleeping. Stored times are integer microseconds
(:func:`to_micros`): exact in both SQLite and PostgreSQL, so hashes over them
(the audit chain) re-verify bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A clock returns the current time as POSIX seconds (like :func:`time.time`).
Clock = Callable[[], float]

#: The production clock.
system_clock: Clock = time.time


def to_micros(seconds: float) -> int:
    """POSIX seconds to integer microseconds (the storage unit)."""
    return round(seconds * 1_000_000)


def from_micros(micros: int) -> float:
    """Integer microseconds back to POSIX seconds."""
    return micros / 1_000_000
