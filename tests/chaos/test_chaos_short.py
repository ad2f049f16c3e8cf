"""The short chaos run of `make test`: 25 s of load with a fault every few seconds, per backend.

State, keyvault and gateway are each SIGKILLed and restarted under load (and, on PostgreSQL,
their database sessions terminated); afterwards every acknowledged command is in the log,
balances and the supply match exactly the acknowledged transfers, the ballot counts exactly
the acknowledged votes, and nothing unacknowledged was applied. `make chaos` runs the same
harness for minutes. Correctness only: recovery times are reported, never asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import ChaosOptions, run_chaos

pytestmark = pytest.mark.e2e

SECONDS = 25.0
INTERVAL = 3.5


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kill_9_under_load_loses_nothing(backend: str, tmp_path: Path) -> None:
    postgres = backend == "postgres"
    report = run_chaos(tmp_path, ChaosOptions(seconds=SECONDS, postgres=postgres, interval=INTERVAL))
    print(report.summary())  # shown with -s or on failure: acknowledged, lost, recovery times
    targets = {event.target for event in report.events}
    assert targets >= {"state", "keyvault", "gateway"} | ({"database"} if postgres else set())
    assert report.transfers > 100, "too little load to prove anything"
    assert report.votes > 50, "too few votes to prove anything"
    assert report.ok, report.summary()
