"""ListAuditEvents over real mTLS: it returns a signed tip to publish, and refuses a rewritten log."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tests.conftest import tls_for
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.config import ServiceConfig
from veil.services.common.tls import channel_credentials
from veil.services.keyvault.audit import verify_tip
from veil.services.keyvault.audit_publish import PublishError, publish
from veil.services.keyvault.config import KekConfig, KeyvaultConfig
from veil.services.keyvault.errors import AuditChainError
from veil.services.keyvault.server import create_server
from veil.services.keyvault.store_sqlite import SqliteStore

from .support import policy_json, write_sim_enclave_policy
from .test_audit_signed import delete_and_recompute

#: A release policy any admitted sim enclave meets (these tests never release a key).
_POLICY = policy_json({"claim": "x-ms-sgx-svn", "greaterOrEquals": 1}, authority="spiffe://veil/keyvault")


@pytest.fixture
def config(pki_dir: Path, tmp_path: Path) -> KeyvaultConfig:
    """A keyvault on SQLite (tmp_path/kv/keyvault.db), a file KEK and the sim enclave policy."""
    return KeyvaultConfig(
        db=str(tmp_path / "kv" / "keyvault.db"),
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=write_sim_enclave_policy(tmp_path / "enclave-policy.json"),
    )


@contextmanager
def _serving(
    service_config: Callable[[str], ServiceConfig], config: KeyvaultConfig, pki_dir: Path
) -> Iterator[keyvault_pb2_grpc.KeyvaultServiceStub]:
    """The keyvault started on `config`, reached as the admin; stopped on leaving."""
    server, port = create_server(service_config("keyvault"), keyvault_config=config)
    server.start()
    try:
        credentials = channel_credentials(tls_for(pki_dir, "admin"))
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            yield keyvault_pb2_grpc.KeyvaultServiceStub(channel)
    finally:
        server.stop(0)


def test_list_audit_events_publishes_a_signed_tip_and_refuses_a_rewrite(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, config: KeyvaultConfig
) -> None:
    with _serving(service_config, config, pki_dir) as admin:
        for name in ("orders", "payroll", "ledger"):
            request = keyvault_pb2.CreateKeyRequest(key_name=name, release_policy_json=_POLICY)
            admin.CreateKey(request, timeout=10)
        release_key = admin.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
        page = admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(), timeout=10)
        tip = page.tip
        assert tip.sequence == page.events[-1].sequence == len(page.events)
        assert tip.hash == page.events[-1].hash
        assert tip.release_public_key == release_key
        assert verify_tip(release_key, tip.sequence, tip.hash, tip.signature)

        owner = SqliteStore(Path(config.db))  # the database's owner, beside the running keyvault
        try:
            delete_and_recompute(owner, 2, keep_signatures=False)  # "orders" was never created, says the log
        finally:
            owner.close()
        with pytest.raises(grpc.RpcError) as refused:
            admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    with pytest.raises(AuditChainError):
        create_server(service_config("keyvault"), keyvault_config=config)  # no start over a forged log


def _cut_back(db: Path, keep: int) -> None:
    """Delete every event after ``keep`` and move the tip back to it (a validly signed older tip)."""
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "DROP TRIGGER kv_audit_no_delete; DROP TRIGGER kv_audit_tip_forward; "
            "DROP TRIGGER kv_audit_signature_no_delete;"
        )
        (digest,) = conn.execute("SELECT hash FROM kv_audit_events WHERE sequence = ?", (keep,)).fetchone()
        conn.execute("DELETE FROM kv_audit_events WHERE sequence > ?", (keep,))
        conn.execute("DELETE FROM kv_audit_signatures WHERE sequence > ?", (keep,))
        conn.execute("UPDATE kv_audit_tip SET sequence = ?, hash = ?", (keep, digest))


def test_published_tips_catch_a_log_cut_back_across_a_restart(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path, config: KeyvaultConfig
) -> None:
    published = tmp_path / "elsewhere" / "audit-tips.jsonl"
    published.parent.mkdir()
    with _serving(service_config, config, pki_dir) as stub:
        release_key = stub.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
        for name in ("orders", "payroll"):
            stub.CreateKey(
                keyvault_pb2.CreateKeyRequest(key_name=name, release_policy_json=_POLICY), timeout=10
            )
            publish(stub, release_key=release_key, log=published)
        stub.DestroyKey(keyvault_pb2.DestroyKeyRequest(key_name="orders"), timeout=10)
        publish(stub, release_key=release_key, log=published)
    tips = [json.loads(line) for line in published.read_text().splitlines()]
    assert [t["sequence"] for t in tips] == [2, 3, 4]
    # The destroy never happened, says the database: the older tip is validly signed, so a
    # restarted keyvault accepts it; the published tip does not.
    _cut_back(Path(config.db), 3)

    with _serving(service_config, config, pki_dir) as stub:
        assert stub.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(), timeout=10).tip.sequence == 3
        with pytest.raises(PublishError, match="before the published tip 4"):
            publish(stub, release_key=release_key, log=published)
        with pytest.raises(PublishError, match="not signed by the pinned release key"):
            publish(stub, release_key=bytes(32), log=published)
    assert len(published.read_text().splitlines()) == 3  # nothing appended on an alarm
