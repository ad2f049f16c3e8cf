"""Collateral from ``VEIL_KEYVAULT_COLLATERAL_DIR``: one file per FMSPC, refused when missing.

Fake platforms (tests/verify/fakes.py) give quotes of two FMSPCs, each with its
collateral; the dev PKI's sim collateral shows the keyvault evaluating a sim quote.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import tls_for
from tests.verify import fakes
from veil.dev.pki import collateral_dir
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.config import ConfigError, ServiceConfig
from veil.services.common.tls import channel_credentials
from veil.services.keyvault.attest import Attestor
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.collateral_files import CollateralFiles, collateral_file_name, quote_fmspc
from veil.services.keyvault.config import ENV_KEYVAULT_COLLATERAL_DIR, KeyvaultConfig
from veil.services.keyvault.errors import AttestationRefusedError
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.server import create_server
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.keyvault.tokens import SigningKeyRing, TokenIssuer
from veil.verify import verify_quote
from veil.verify.binding import expected_report_data
from veil.verify.collateral import parse_tcb_info
from veil.verify.roots import load_root_pem

from .support import CALLER, RELEASE_PUBLIC_KEY, FakeClock, FakeEnclave, dev_keyvault_config, sim_provider

FMSPC_A = fakes.FMSPC
FMSPC_B = bytes.fromhex("00a067110000")


class Platform:
    """A fake platform: its PKI, one quote, and the collateral JSON for its FMSPC."""

    def __init__(self, fmspc: bytes) -> None:
        self.pki = fakes.make_pki(fmspc=fmspc)
        self.fmspc = fmspc
        self.quote = fakes.build_quote(self.pki)

    def collateral(self, status: str = "UpToDate") -> str:
        tcb_info = fakes.tcb_info_json(fmspc=self.fmspc, levels=[fakes.tcb_level(status)])
        return json.dumps(fakes.build_collateral(self.pki, tcb_info=tcb_info))


@pytest.fixture(scope="module")
def platforms() -> tuple[Platform, Platform]:
    return Platform(FMSPC_A), Platform(FMSPC_B)


def _write(directory: Path, platform: Platform, status: str = "UpToDate") -> Path:
    path = directory / collateral_file_name(platform.fmspc)
    path.write_text(platform.collateral(status))
    return path


def _status(files: CollateralFiles, platform: Platform) -> str | None:
    collateral = files(platform.quote)
    verified = verify_quote(
        platform.quote, root_public_key=platform.pki.root_public_key, collateral=collateral, now=fakes.NOW
    )
    return verified.tcb_status


def test_collateral_is_chosen_by_the_quotes_fmspc(
    platforms: tuple[Platform, Platform], tmp_path: Path
) -> None:
    a, b = platforms
    assert (quote_fmspc(a.quote), quote_fmspc(b.quote)) == (FMSPC_A, FMSPC_B)
    _write(tmp_path, a, "UpToDate")
    _write(tmp_path, b, "OutOfDate")
    (tmp_path / "README.md").write_text("not collateral: ignored")
    files = CollateralFiles(tmp_path)
    assert files.platforms == (FMSPC_A, FMSPC_B)
    assert files.source == f"files:{tmp_path.absolute()}"
    assert parse_tcb_info(files(a.quote).tcb_info).fmspc == FMSPC_A
    assert (_status(files, a), _status(files, b)) == ("UpToDate", "OutOfDate")


def test_a_platform_without_a_file_is_refused(platforms: tuple[Platform, Platform], tmp_path: Path) -> None:
    a, b = platforms
    _write(tmp_path, a)
    files = CollateralFiles(tmp_path)
    with pytest.raises(
        AttestationRefusedError, match=f"no collateral for this platform \\(FMSPC {FMSPC_B.hex()}\\)"
    ) as refused:
        files(b.quote)
    assert refused.value.reason == "QUOTE_INVALID"
    with pytest.raises(AttestationRefusedError, match="quote refused") as garbage:
        files(b"not a quote")
    assert garbage.value.reason == "QUOTE_INVALID"
    assert _status(files, a) == "UpToDate"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (collateral_file_name(FMSPC_A), "{not json", "is invalid: collateral: not valid JSON"),
        (collateral_file_name(FMSPC_A), "{}", "is invalid: collateral: missing"),
        (
            collateral_file_name(FMSPC_B),
            None,
            f"holds TCB info for FMSPC {FMSPC_A.hex()}, not {FMSPC_B.hex()}",
        ),
        ("00906EA10000.json", None, "is not named <fmspc>.json"),
        ("platform-a.json", None, "is not named <fmspc>.json"),
    ],
)
def test_an_invalid_file_stops_the_keyvault_at_start(
    platforms: tuple[Platform, Platform], tmp_path: Path, name: str, content: str | None, reason: str
) -> None:
    (tmp_path / name).write_text(platforms[0].collateral() if content is None else content)
    with pytest.raises(ConfigError, match=reason) as refused:
        CollateralFiles(tmp_path)
    assert ENV_KEYVAULT_COLLATERAL_DIR in str(refused.value)


def test_a_missing_directory_stops_the_keyvault_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        CollateralFiles(tmp_path / "absent")


def test_a_changed_file_is_reloaded_and_a_broken_one_refuses(
    platforms: tuple[Platform, Platform], tmp_path: Path
) -> None:
    a, _ = platforms
    path = _write(tmp_path, a, "UpToDate")
    files = CollateralFiles(tmp_path)
    assert _status(files, a) == "UpToDate"

    def rewrite(text: str) -> None:
        before = path.stat().st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))  # a visible mtime change

    rewrite(a.collateral("SWHardeningNeeded"))
    assert _status(files, a) == "SWHardeningNeeded"
    rewrite("{broken")
    with pytest.raises(AttestationRefusedError, match="is invalid") as refused:
        files(a.quote)
    assert refused.value.reason == "QUOTE_INVALID"
    rewrite(a.collateral("UpToDate"))
    assert _status(files, a) == "UpToDate"


def test_the_config_names_the_directory(tmp_path: Path) -> None:
    env = {"VEIL_KEYVAULT_ATTESTATION_ROOT": "dev"}
    assert KeyvaultConfig.from_env(tmp_path, env).collateral_dir is None
    configured = KeyvaultConfig.from_env(tmp_path, {**env, ENV_KEYVAULT_COLLATERAL_DIR: "/srv/collateral"})
    assert configured.collateral_dir == Path("/srv/collateral")


@pytest.fixture
def attestor_for(
    pki_dir: Path, tmp_path: Path
) -> Iterator[Callable[[CollateralFiles], tuple[Attestor, AuditLog]]]:
    """Attestors over the dev root with a given collateral provider (stores closed afterwards)."""
    stores: list[SqliteStore] = []

    def make(files: CollateralFiles) -> tuple[Attestor, AuditLog]:
        clock = FakeClock(time.time())  # the dev PKI was issued at the real current time
        store = SqliteStore(tmp_path / f"keyvault-{len(stores)}.db")
        stores.append(store)
        audit = AuditLog(store, clock)
        ring = SigningKeyRing(store, FileKek(tmp_path / "kek.bin"), clock, audit)
        attestor = Attestor(
            TokenIssuer(ring, issuer="spiffe://veil/keyvault", clock=clock),
            audit,
            clock,
            root_public_key=load_root_pem(pki_dir / "sgx-root.pem"),
            release_public_key=RELEASE_PUBLIC_KEY,
            collateral=files,
        )
        return attestor, audit

    yield make
    for store in stores:
        store.close()


def test_the_keyvault_evaluates_sim_quotes_against_the_dev_collateral(
    attestor_for: Callable[[CollateralFiles], tuple[Attestor, AuditLog]], pki_dir: Path, tmp_path: Path
) -> None:
    enclave = FakeEnclave()
    nonce = os.urandom(32)
    quote = sim_provider(pki_dir).quote(expected_report_data(enclave.runtime_data, nonce))
    attestor, _ = attestor_for(CollateralFiles(collateral_dir(pki_dir)))
    issued = attestor.attest(quote, enclave.runtime_data, nonce, caller=CALLER)
    assert issued.claims["x-ms-sgx-tcb-status"] == "UpToDate"

    empty = tmp_path / "no-collateral"
    empty.mkdir()
    refusing, audit = attestor_for(CollateralFiles(empty))
    with pytest.raises(AttestationRefusedError, match="no collateral for this platform") as refused:
        refusing.attest(quote, enclave.runtime_data, nonce, caller=CALLER)
    assert refused.value.reason == "QUOTE_INVALID"
    event = audit.list_events().events[-1]
    assert (event.action, event.outcome) == ("attest", "refused")


@pytest.mark.parametrize("configured", [True, False])
def test_get_status_says_where_collateral_comes_from(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path, configured: bool
) -> None:
    config = dev_keyvault_config(tmp_path / "kv", pki_dir, collateral_dir(pki_dir) if configured else None)
    server, port = create_server(service_config("keyvault"), keyvault_config=config)
    server.start()
    try:
        credentials = channel_credentials(tls_for(pki_dir, "admin"))
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            status = keyvault_pb2_grpc.KeyvaultServiceStub(channel).GetStatus(
                keyvault_pb2.GetStatusRequest(), timeout=10
            )
    finally:
        server.stop(0)
    expected = f"files:{collateral_dir(pki_dir).absolute()}" if configured else "none"
    assert status.collateral_source == expected
