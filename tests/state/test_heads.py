"""Commit-head advances: each instance's links since the last confirmed head go to the keyvault as
one path (coalesced while a round is in flight), every confirmation reaches the host, a broken
path is a refusal, and stop() still flushes what is pending."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state.heads import WARN_AFTER_FAILURES, Backoff, HeadAdvancer
from veil.services.state.keyvault_client import KeyvaultUnavailable
from veil.services.state.metrics import StateMetrics


class PathKeyvault:
    """Stands in for KeyvaultClient.advance_commit_head: checks paths like the keyvault, slowly."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.rounds: list[list[int]] = []
        self.head = (0, wire.ZERO_HASH)
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def advance_commit_head(
        self, links: Sequence[envelope_pb2.CommitLink], token: str, hold_key_version: int = 0
    ) -> keyvault_pb2.AdvanceCommitHeadResponse:
        time.sleep(self.delay_s)
        with self.lock:
            self.rounds.append([link.head.sequence for link in links])
            bases = [(link.base.sequence, link.base.hash) for link in links]
            assert self.head in bases or (links[-1].head.sequence, links[-1].head.hash) == self.head
            self.head = (links[-1].head.sequence, links[-1].head.hash)
            head = envelope_pb2.CommitHead(sequence=self.head[0], hash=self.head[1])
        confirmation = envelope_pb2.HeadConfirmation(instance_id="coins", head=head)
        return keyvault_pb2.AdvanceCommitHeadResponse(sequence=head.sequence, confirmation=confirmation)


def _hash(sequence: int) -> bytes:
    return hashlib.sha256(sequence.to_bytes(8, "big")).digest() if sequence else wire.ZERO_HASH


def _link(base: int, head: int) -> envelope_pb2.CommitLink:
    return envelope_pb2.CommitLink(
        instance_id="coins",
        base=envelope_pb2.CommitHead(sequence=base, hash=_hash(base)),
        head=envelope_pb2.CommitHead(sequence=head, hash=_hash(head)),
    )


def _advancer(keyvault: Any, **kwargs: Any) -> tuple[HeadAdvancer, list[int], list[str]]:
    confirmed: list[int] = []
    refused: list[str] = []
    advancer = HeadAdvancer(
        keyvault,
        lambda fresh: "token",
        metrics=StateMetrics(),
        on_refused=lambda instance_id, why: refused.append(why),
        on_confirmed=lambda advanced: confirmed.append(advanced.confirmation.head.sequence),
        **kwargs,
    )
    return advancer, confirmed, refused


def test_links_coalesce_into_paths_and_every_confirmation_reaches_the_host() -> None:
    keyvault = PathKeyvault(delay_s=0.01)  # a keyvault round trip: batches gather meanwhile
    advancer, confirmed, refused = _advancer(keyvault)
    advancer.start()
    for sequence in range(1, 201):  # 200 batches committed over ~0.2 s
        advancer.push(_link(sequence - 1, sequence))
        time.sleep(0.001)
    assert advancer.wait_confirmed("coins", 200, timeout=5)
    advancer.stop(flush_s=2.0)
    assert keyvault.head[0] == 200
    assert len(keyvault.rounds) < 100  # several links per round, not one call per batch
    assert all(len(path) >= 1 for path in keyvault.rounds)
    assert confirmed == sorted(confirmed)
    assert confirmed[-1] == 200
    assert (advancer.confirmed("coins"), advancer.lag("coins"), refused) == (200, 0, [])


def test_a_link_that_does_not_extend_the_path_is_refused_not_sent() -> None:
    keyvault = PathKeyvault()
    advancer, _, refused = _advancer(keyvault)
    advancer.push(_link(0, 1))
    advancer.push(_link(5, 6))  # a gap: never sent as if it chained
    assert len(refused) == 1
    assert "does not extend" in refused[0]
    advancer.start()
    assert advancer.wait_confirmed("coins", 1, timeout=5)
    advancer.stop(flush_s=1.0)
    assert keyvault.rounds == [[1]]


def test_stop_flushes_pending_links() -> None:
    keyvault = PathKeyvault()
    advancer, confirmed, _ = _advancer(keyvault)
    advancer.push(_link(0, 1))
    advancer.push(_link(1, 2))
    advancer.start()
    advancer.stop(flush_s=5.0)  # a clean stop sends what is pending first
    assert confirmed == [2]
    assert keyvault.rounds == [[1, 2]]


class AwayKeyvault:
    """A keyvault that never answers: every advance fails as unreachable."""

    def __init__(self) -> None:
        self.attempts = 0

    def advance_commit_head(
        self, links: Sequence[envelope_pb2.CommitLink], token: str, hold_key_version: int = 0
    ) -> keyvault_pb2.AdvanceCommitHeadResponse:
        self.attempts += 1
        raise KeyvaultUnavailable("keyvault at kv:1 unreachable (DEADLINE_EXCEEDED)")


def test_rounds_that_keep_failing_are_logged_once_retries_stop_looking_transient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keyvault = AwayKeyvault()
    advancer, confirmed, refused = _advancer(keyvault, backoff=Backoff(initial_s=0.01, max_s=0.01))
    advancer.push(_link(0, 1))
    with caplog.at_level(logging.WARNING, logger="veil.services.state.heads"):
        advancer.start()
        deadline = time.monotonic() + 10
        while keyvault.attempts < WARN_AFTER_FAILURES + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        advancer.stop()
    warnings = [r.getMessage() for r in caplog.records if "rounds in a row" in r.getMessage()]
    assert warnings == [
        f"commit heads and read fences have failed {WARN_AFTER_FAILURES} rounds in a row (retrying): "
        "keyvault at kv:1 unreachable (DEADLINE_EXCEEDED); commit heads lag by 1 entries"
    ]
    assert (confirmed, refused) == ([], [])
