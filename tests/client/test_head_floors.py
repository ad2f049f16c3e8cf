"""The head floor (monotonic reads) outlives the client: the CLI runs a process per command.

A client refuses a query answer that reads a head older than one it saw acknowledged
(docs/protocol.md, `stale-read`). The floor was kept in memory only, so every `veil` command,
a new process, started from nothing and never refused a stale read (an outside review). With a
data dir it is now kept in `heads.json`: loaded at start, merged and saved at close.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gateway.support import InProcessMesh, token_config
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import IntegrityError
from veil.sdk.heads import HEADS_FILE, HeadFloors
from veil.sdk.identity import new_identity

GENESIS, OTHER = bytes(range(32)), bytes(32)


def test_a_later_client_on_the_data_dir_keeps_the_floor_and_refuses_an_older_read(
    mesh: InProcessMesh,
) -> None:
    alice = new_identity(mesh.data_dir, "alice")
    bob = new_identity(mesh.data_dir, "bob")
    with mesh.connect() as first:
        first.create_instance("coins", token_config(alice.public_key))
        first.token("coins", alice).mint(bob.account, 5)
        seen = first.head_floor("coins")
    assert seen > 0
    with mesh.connect(counters=MemoryCounters()) as second:  # another process, same data dir
        second.attest("coins")
        assert second.head_floor("coins") == seen
        assert second.token("coins", bob).balance() == 5  # reads the head it saw, or a later one
        # A floor above what the host now serves (a head seen before it rolled the enclave back):
        second.heads.saw("coins", second.attest("coins").descriptor.genesis_hash, seen + 5)  # type: ignore[union-attr]
        with pytest.raises(IntegrityError, match="stale or rolled-back"):
            second.token("coins", bob).balance()


def test_floors_merge_by_the_higher_head_of_one_genesis(tmp_path: Path) -> None:
    path = tmp_path / HEADS_FILE
    one, two = HeadFloors(path), HeadFloors(path)  # two processes that started together
    one.saw("coins", GENESIS, 7)
    one.saw("votes", GENESIS, 3)
    two.saw("coins", GENESIS, 5)
    one.save()
    two.save()  # lower: the file keeps 7
    kept = HeadFloors(path)
    assert kept.floor("coins", GENESIS) == 7
    assert kept.floor("votes", GENESIS) == 3
    assert kept.floor("coins", OTHER) == 0  # another instance under the id starts from nothing


def test_a_floor_of_another_genesis_is_replaced_not_kept(tmp_path: Path) -> None:
    path = tmp_path / HEADS_FILE
    old = HeadFloors(path)
    old.saw("coins", OTHER, 90)
    old.save()
    new = HeadFloors(path)
    new.saw("coins", GENESIS, 2)  # the id names a new instance now (re-pinned by its user)
    new.save()
    assert HeadFloors(path).floor("coins", GENESIS) == 2


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"coins": 5}',
        '{"coins": {"genesis_hash": "zz", "head": 1}}',
        '{"coins": {"head": -1}}',
    ],
)
def test_an_unreadable_file_or_entry_is_no_floor(tmp_path: Path, text: str) -> None:
    path = tmp_path / HEADS_FILE
    path.write_text(text)
    floors = HeadFloors(path)
    assert floors.floor("coins", GENESIS) == 0
    floors.saw("coins", GENESIS, 4)
    floors.save()  # and a save replaces it with what is known
    assert json.loads(path.read_text()) == {"coins": {"genesis_hash": GENESIS.hex(), "head": 4}}


def test_a_save_leaves_floors_it_only_loaded_as_the_file_has_them(tmp_path: Path) -> None:
    """A third review: `save` merged every floor it knew, so a process started before the
    instance was re-pinned wrote its old genesis's floor over the new one another process saved."""
    path = tmp_path / HEADS_FILE
    first = HeadFloors(path)
    first.saw("coins", OTHER, 100)
    first.save()
    long_running = HeadFloors(path)  # loads (OTHER, 100), raises nothing of coins
    long_running.saw("votes", GENESIS, 1)
    repinned = HeadFloors(path)
    repinned.saw("coins", GENESIS, 40)
    repinned.save()
    long_running.save()
    assert HeadFloors(path).floor("coins", GENESIS) == 40
    assert HeadFloors(path).floor("votes", GENESIS) == 1


def test_nothing_seen_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / HEADS_FILE
    HeadFloors(path).save()
    assert not path.parent.exists()
