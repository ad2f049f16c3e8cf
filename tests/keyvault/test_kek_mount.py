"""The sim overlay's file KEK: a Kubernetes Secret mount opens through the init-container copy,
and the key file check (no symlink, owner-only) is not loosened for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from veil.services.keyvault.errors import KekError
from veil.services.keyvault.kek import FileKek, install_key_file, main


def secret_volume(root: Path, key: bytes) -> Path:
    """A Secret volume as the kubelet writes it: kek -> ..data/kek, ..data -> ..<timestamp>/, 0440."""
    stamp = root / "..2026_12_04_05_00_00.000000001"
    stamp.mkdir(parents=True)
    (stamp / "kek").write_bytes(key)
    os.chmod(stamp / "kek", 0o440)
    (root / "..data").symlink_to(stamp.name)
    (root / "kek").symlink_to("..data/kek")
    return root / "kek"


def test_the_secret_file_itself_is_refused(tmp_path: Path) -> None:
    mounted = secret_volume(tmp_path / "secret", os.urandom(32))
    with pytest.raises(KekError, match="cannot be opened"):  # a symlink: O_NOFOLLOW
        FileKek(mounted, create=False)
    with pytest.raises(KekError, match="group or others"):  # the file it points to: 0440
        FileKek(mounted.resolve(), create=False)


def test_the_installed_copy_opens_with_the_same_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    mounted = secret_volume(tmp_path / "secret", key)
    target = tmp_path / "run" / "kek"
    target.parent.mkdir()
    assert main([str(mounted), str(target)]) == 0
    assert (target.stat().st_mode & 0o777, target.read_bytes()) == (0o600, key)
    reference = tmp_path / "reference"
    reference.write_bytes(key)
    reference.chmod(0o600)
    assert FileKek(target, create=False).key_id == FileKek(reference, create=False).key_id


def test_install_never_overwrites_or_follows_a_link(tmp_path: Path) -> None:
    mounted = secret_volume(tmp_path / "secret", os.urandom(32))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    planted = tmp_path / "planted"
    planted.symlink_to(victim)
    with pytest.raises(KekError, match="cannot be created"):
        install_key_file(mounted, planted)
    assert victim.read_bytes() == b"keep"
    assert main([str(mounted), str(victim)]) == 1  # an existing file is not replaced


def test_a_wrong_sized_secret_is_refused(tmp_path: Path) -> None:
    mounted = secret_volume(tmp_path / "secret", b"short")
    with pytest.raises(KekError, match="exactly 32 bytes"):
        install_key_file(mounted, tmp_path / "kek")
    assert not (tmp_path / "kek").exists()
