"""Fixtures of the attack suite: an enclave world that resets itself after a legitimate change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.attack.enclave_world import World, build_world


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
