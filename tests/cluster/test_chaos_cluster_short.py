"""A short `make chaos-cluster`: four node losses and one split brain under load, nothing lost."""

from __future__ import annotations

import pytest

from tests.cluster.chaos import run

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_a_short_chaos_run_loses_and_duplicates_nothing() -> None:
    result = run(episodes=5, split_every=5, ledgers_count=4, seed=7, log=False)
    print("\n" + result.summary())
    assert result.ok, result.summary()
    assert (result.node_losses, result.split_brains) == (4, 1)
    assert result.acknowledged > 0
