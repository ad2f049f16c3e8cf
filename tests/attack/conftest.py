"""Fixtures of the attack suite: an enclave world that resets itself after a legitimate change, and
the real services (a `Lab`) each attack module drives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attack.enclave_world import World, build_world
from tests.attack.mesh import KEYVAULT, STATE, Lab, RunningKeyvault, RunningState


class WorldBox:
    """A module's enclave world; `reset` rebuilds it when a test input legitimately changed it.

    A plain class with a short repr: hypothesis prints the fixtures of a failing example.
    """

    def __init__(self, pki_dir: Path, world: World) -> None:
        self.pki_dir = pki_dir
        self.world = world

    def __repr__(self) -> str:
        return "WorldBox()"

    def reset(self) -> None:
        self.world = build_world(self.pki_dir)


@pytest.fixture(scope="module")
def world_box(pki_dir: Path) -> WorldBox:
    """One world per module (building one takes a few milliseconds; examples share it)."""
    return WorldBox(pki_dir, build_world(pki_dir))


@pytest.fixture(scope="module")
def lab(
    pki_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Lab]:
    """The real services, started on first use and shared by one module's tests."""
    started = Lab(pki_dir, tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    yield started
    started.close()


@pytest.fixture(scope="module")
def keyvault(lab: Lab) -> RunningKeyvault:
    running = lab.get(KEYVAULT)
    assert isinstance(running, RunningKeyvault)
    return running


@pytest.fixture(scope="module")
def state(lab: Lab) -> RunningState:
    running = lab.get(STATE)
    assert isinstance(running, RunningState)
    return running
