"""ListAuditEvents over real mTLS: it returns a signed tip to publish, and refuses a rewritten log."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.conftest import tls_for
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.config import ServiceConfig
from veil.services.common.tls import channel_credentials
from veil.services.keyvault.audit import event_hash, verify_tip
from veil.services.keyvault.audit_publish import PublishError, publish
from veil.services.keyvault.config import KekConfig, KeyvaultConfig
from veil.services.keyvault.errors import AuditChainError
from veil.services.keyvault.server import create_server

from .support import policy_json, write_sim_enclave_policy


def _rewrite_without_event(db: Path, victim: int) -> None:
    """Delete event ``victim`` and recompute the chain, as anyone with write access to the file can."""
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "DROP TRIGGER kv_audit_no_delete; DROP TRIGGER kv_audit_append_at_tip; "
            "DROP TRIGGER kv_audit_tip_forward; DROP TRIGGER kv_audit_signature_no_delete;"
        )
        rows = conn.execute(
            "SELECT sequence, time_us, action, outcome, caller, detail_json, hash FROM kv_audit_events "
            "ORDER BY sequence"
        ).fetchall()
        conn.execute("DELETE FROM kv_audit_events WHERE sequence >= ?", (victim,))
        conn.execute("DELETE FROM kv_audit_signatures WHERE sequence >= ?", (victim,))
        previous = rows[victim - 2][6]
        sequence = victim
        for _, time_us, action, outcome, caller, detail_json, _ in rows[victim:]:
            digest = event_hash(
                previous,
                sequence=sequence,
                time_us=time_us,
                action=action,
                outcome=outcome,
                caller=caller,
                detail_json=detail_json,
            )
            conn.execute(
                "INSERT INTO kv_audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sequence, time_us, action, outcome, caller, detail_json, previous, digest),
            )
            previous, sequence = digest, sequence + 1
        conn.execute("UPDATE kv_audit_tip SET sequence = ?, hash = ?", (sequence - 1, previous))


def test_list_audit_events_publishes_a_signed_tip_and_refuses_a_rewrite(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "kv" / "keyvault.db"
    config = KeyvaultConfig(
        db=str(db),
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=write_sim_enclave_policy(tmp_path / "enclave-policy.json"),
    )
    server, port = create_server(service_config("keyvault"), keyvault_config=config)
    server.start()
    try:
        with grpc.secure_channel(
            f"127.0.0.1:{port}", channel_credentials(tls_for(pki_dir, "admin"))
        ) as channel:
            admin = keyvault_pb2_grpc.KeyvaultServiceStub(channel)
            policy = policy_json(
                {"claim": "x-ms-sgx-svn", "greaterOrEquals": 1}, authority="spiffe://veil/keyvault"
            )
            for name in ("orders", "payroll", "ledger"):
                request = keyvault_pb2.CreateKeyRequest(key_name=name, release_policy_json=policy)
                admin.CreateKey(request, timeout=10)
            release_key = admin.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
            page = admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(), timeout=10)
            tip = page.tip
            assert tip.sequence == page.events[-1].sequence == len(page.events)
            assert tip.hash == page.events[-1].hash
            assert tip.release_public_key == release_key
            assert verify_tip(release_key, tip.sequence, tip.hash, tip.signature)

            _rewrite_without_event(db, 2)  # "orders" was never created, says the forged log
            with pytest.raises(grpc.RpcError) as refused:
                admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    finally:
        server.stop(0)
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
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "kv" / "keyvault.db"
    config = KeyvaultConfig(
        db=str(db),
        kek=KekConfig(provider="file", file=tmp_path / "kv" / "kek.bin"),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=write_sim_enclave_policy(tmp_path / "enclave-policy.json"),
    )
    published = tmp_path / "elsewhere" / "audit-tips.jsonl"
    published.parent.mkdir()
    policy = policy_json({"claim": "x-ms-sgx-svn", "greaterOrEquals": 1}, authority="spiffe://veil/keyvault")

    def serve(then: Callable[[keyvault_pb2_grpc.KeyvaultServiceStub], None]) -> None:
        server, port = create_server(service_config("keyvault"), keyvault_config=config)
        server.start()
        try:
            with grpc.secure_channel(
                f"127.0.0.1:{port}", channel_credentials(tls_for(pki_dir, "admin"))
            ) as channel:
                then(keyvault_pb2_grpc.KeyvaultServiceStub(channel))
        finally:
            server.stop(0)

    release_key = b""

    def create_and_publish(stub: keyvault_pb2_grpc.KeyvaultServiceStub) -> None:
        nonlocal release_key
        release_key = stub.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
        for name in ("orders", "payroll"):
            stub.CreateKey(
                keyvault_pb2.CreateKeyRequest(key_name=name, release_policy_json=policy), timeout=10
            )
            publish(stub, release_key=release_key, log=published)
        stub.DestroyKey(keyvault_pb2.DestroyKeyRequest(key_name="orders"), timeout=10)
        publish(stub, release_key=release_key, log=published)

    serve(create_and_publish)
    tips = [json.loads(line) for line in published.read_text().splitlines()]
    assert [t["sequence"] for t in tips] == [2, 3, 4]
    # The destroy never happened, says the database: the older tip is validly signed, so a
    # restarted keyvault accepts it; the published tip does not.
    _cut_back(db, 3)

    def check(stub: keyvault_pb2_grpc.KeyvaultServiceStub) -> None:
        assert stub.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(), timeout=10).tip.sequence == 3
        with pytest.raises(PublishError, match="before the published tip 4"):
            publish(stub, release_key=release_key, log=published)
        with pytest.raises(PublishError, match="not signed by the pinned release key"):
            publish(stub, release_key=bytes(32), log=published)

    serve(check)
    assert len(published.read_text().splitlines()) == 3  # nothing appended on an alarm
