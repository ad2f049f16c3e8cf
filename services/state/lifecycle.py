"""Where the state service is on its way to SERVING, told to GetStatus, health and the logs.

Health is SERVING exactly while the step is SERVING: a replica that is attesting, waiting for
the keyvault, replaying its log or has refused its data reports NOT_SERVING, and its status
detail says why (e.g. which instance and sequence failed a check).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from typing import TypeAlias

from veil.state.v1 import state_pb2

Step: TypeAlias = state_pb2.LifecycleStep.ValueType

STARTING = state_pb2.LIFECYCLE_STEP_STARTING
ATTESTING = state_pb2.LIFECYCLE_STEP_ATTESTING
OBTAINING_KEYS = state_pb2.LIFECYCLE_STEP_OBTAINING_KEYS
RECOVERING = state_pb2.LIFECYCLE_STEP_RECOVERING
SERVING = state_pb2.LIFECYCLE_STEP_SERVING
FAILED = state_pb2.LIFECYCLE_STEP_FAILED
DRAINING = state_pb2.LIFECYCLE_STEP_DRAINING

_log = logging.getLogger(__name__)


def step_name(step: Step) -> str:
    """e.g. "RECOVERING"."""
    return state_pb2.LifecycleStep.Name(step).removeprefix("LIFECYCLE_STEP_")


class Lifecycle:
    """The current step and its detail; `on_change(serving)` drives the health service."""

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._step: Step = STARTING
        self._detail = "starting"
        self._on_change = on_change
        self._changed = threading.Condition(self._lock)

    def set(self, step: Step, detail: str) -> None:
        """Move to `step` with `detail` (logged; health follows entering or leaving SERVING)."""
        with self._lock:
            previous = self._step
            if (step, detail) == (self._step, self._detail):
                return
            self._step, self._detail = step, detail
            self._changed.notify_all()
        level = logging.ERROR if step == FAILED else logging.INFO
        _log.log(level, "%s: %s", step_name(step), detail)
        if self._on_change is not None and (previous == SERVING) != (step == SERVING):
            self._on_change(step == SERVING)

    def detail_only(self, detail: str) -> None:
        """Update the detail of the current step (e.g. a retry count)."""
        with self._lock:
            step = self._step
        self.set(step, detail)

    @property
    def step(self) -> Step:
        with self._lock:
            return self._step

    def current(self) -> tuple[Step, str]:
        """(step, detail)."""
        with self._lock:
            return self._step, self._detail

    def wait_for(self, steps: Collection[Step], timeout: float) -> Step | None:
        """Block until the step is one of `steps`; returns it, or None on timeout."""
        with self._changed:
            if self._changed.wait_for(lambda: self._step in steps, timeout):
                return self._step
            return None
