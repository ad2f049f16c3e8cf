"""One data-dir default for every command, `$VEIL_DATA_DIR` else `.veil`, and `veil up` says
what to export for a mesh started with other ports or another data dir (a new user had to pass
`--data-dir` to every command, told nothing by the banner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.cli.main import main
from veil.dev.supervisor import client_exports


def test_every_command_takes_its_data_dir_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VEIL_DATA_DIR", str(tmp_path / "mesh2"))
    assert main(["identity", "new", "alice"]) == 0
    assert (tmp_path / "mesh2" / "identities" / "alice.key").is_file()
    assert not (tmp_path / ".veil").exists()
    assert main(["contact", "add", "al", "cd" * 32]) == 0
    assert (tmp_path / "mesh2" / "identities" / "contacts.json").is_file()
    # --data-dir still wins over the environment.
    assert main(["identity", "new", "bob", "--data-dir", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "identities" / "bob.key").is_file()
    capsys.readouterr()


def test_veil_up_says_what_to_export_only_when_it_is_not_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert client_exports(tmp_path / ".veil", 0) == ""
    assert client_exports(tmp_path / ".veil", -20000) == "VEIL_GATEWAY=127.0.0.1:30051"
    assert (
        client_exports(tmp_path / "my mesh", -20000)
        == f"VEIL_GATEWAY=127.0.0.1:30051 VEIL_DATA_DIR='{tmp_path / 'my mesh'}'"
    )
