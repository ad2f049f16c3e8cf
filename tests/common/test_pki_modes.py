"""Dev PKI file modes: `--force` narrows old wide files, the CA key lives apart, wide keys are refused."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from veil.dev.pki import ca_key_dir, init_pki
from veil.services.common.config import TlsFiles
from veil.services.common.tls import channel_credentials, server_credentials


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_force_narrows_a_wide_old_pki(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, now=dt.datetime.now(dt.UTC))
    # Someone (a careless copy, an old version) left the directory and keys world-readable.
    pki.chmod(0o755)
    for key in pki.glob("*-key.pem"):
        key.chmod(0o644)
    (pki / "ca-key.pem").write_bytes(b"an older init's CA key")
    init_pki(pki, force=True, now=dt.datetime.now(dt.UTC))
    assert _mode(pki) == 0o700
    keys = sorted(pki.glob("*-key.pem"))
    assert {k.name for k in keys} == {
        f"{n}-key.pem" for n in ("admin", "gateway", "keyvault", "state", "sgx-pck-leaf")
    }
    assert all(_mode(k) == 0o600 for k in keys), [(k.name, oct(_mode(k))) for k in keys]
    # The CA key is not among the services' files at all.
    ca_key = ca_key_dir(pki) / "ca-key.pem"
    assert (_mode(ca_key.parent), _mode(ca_key)) == (0o700, 0o600)
    assert b"PRIVATE KEY" in ca_key.read_bytes()


def test_init_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, now=dt.datetime.now(dt.UTC))
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (pki / "state-key.pem").unlink()
    (pki / "state-key.pem").symlink_to(victim)
    with pytest.raises(OSError):
        init_pki(pki, force=True, now=dt.datetime.now(dt.UTC))
    assert victim.read_text() == "untouched"


def _state_tls_with_key_mode(tmp_path: Path, mode: int) -> TlsFiles:
    """The state's mTLS files from a fresh dev PKI, its key chmod-ed to `mode`."""
    pki = tmp_path / "pki"
    init_pki(pki, now=dt.datetime.now(dt.UTC))
    tls = TlsFiles(cert=pki / "state.pem", key=pki / "state-key.pem", ca=pki / "ca.pem")
    os.chmod(tls.key, mode)
    return tls


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_a_key_others_can_read_or_change_is_refused_when_loaded(tmp_path: Path, mode: int) -> None:
    tls = _state_tls_with_key_mode(tmp_path, mode)
    with pytest.raises(PermissionError, match="chmod 600"):
        channel_credentials(tls)
    with pytest.raises(PermissionError, match="chmod 600"):
        server_credentials(tls)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o440, 0o640])
def test_owner_and_group_read_keys_load(tmp_path: Path, mode: int) -> None:
    # 0440 is how Kubernetes mounts a Secret for the pod's fsGroup.
    tls = _state_tls_with_key_mode(tmp_path, mode)
    channel_credentials(tls)
    server_credentials(tls)
