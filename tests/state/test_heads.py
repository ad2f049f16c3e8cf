"""Commit-head advances are coalesced and paced: a busy host does not cost the keyvault a call
per batch, yet the newest head always arrives and stop() still flushes it."""

from __future__ import annotations

import threading
import time
from typing import Any

from veil.enclave.v1 import envelope_pb2

from services.state.heads import HeadAdvancer
from services.state.metrics import StateMetrics


class CountingKeyvault:
    """Stands in for KeyvaultClient.advance_commit_head: records what arrives."""

    def __init__(self) -> None:
        self.sequences: list[int] = []
        self.lock = threading.Lock()

    def advance_commit_head(self, head: envelope_pb2.SignedCommitHead, token: str) -> int:
        with self.lock:
            self.sequences.append(head.head.sequence)
        return head.head.sequence


def _head(sequence: int) -> envelope_pb2.SignedCommitHead:
    return envelope_pb2.SignedCommitHead(instance_id="coins", head=envelope_pb2.CommitHead(sequence=sequence))


def _advancer(keyvault: Any, pace_s: float) -> HeadAdvancer:
    return HeadAdvancer(
        keyvault, lambda fresh: "token", metrics=StateMetrics(), on_refused=lambda i, m: None, pace_s=pace_s
    )


def test_a_stream_of_commits_is_advanced_a_few_times_and_ends_at_the_newest_head() -> None:
    keyvault = CountingKeyvault()
    advancer = _advancer(keyvault, pace_s=0.05)
    advancer.start()
    for sequence in range(1, 201):  # 200 batches committed over ~0.2 s
        advancer.committed(_head(sequence))
        time.sleep(0.001)
    advancer.stop(flush_s=2.0)
    assert keyvault.sequences[-1] == 200
    assert keyvault.sequences == sorted(keyvault.sequences)
    assert len(keyvault.sequences) < 50  # coalesced by the pace, not one call per commit
    assert advancer.confirmed("coins") == 200
    assert advancer.lag("coins") == 0
