"""Hypothesis settings for the attack suite: deterministic, no deadline, scalable.

Every test is derandomized (the same examples on every run and machine) and keeps no example
database, so CI is stable and a failure reproduces with a plain re-run. `VEIL_ATTACK_SCALE`
multiplies every example count (e.g. 10 for a deeper local run); the open-ended search is
`python -m tests.attack.fuzz --seconds N`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("VEIL_ATTACK_SCALE", "1"))


def attack_settings(examples: int) -> settings:
    """`examples` (times VEIL_ATTACK_SCALE) derandomized examples without a deadline."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        # Inputs are built from st.randoms(): slow-ish and sometimes large by design.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
