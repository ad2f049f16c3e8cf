"""The audit tables belong to a role the keyvault's own database role cannot act as (PostgreSQL).

The service role may read and append; deleting, truncating, rewriting the tip, dropping or
disabling the triggers and dropping the tables are refused. The database superuser can still do
all of it, and then the signed tips catch the rewrite.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.audit_owner import AuditOwnerError, secure_audit_tables
from veil.services.keyvault.errors import AuditChainError, StoreError
from veil.services.keyvault.store_postgres import PostgresStore

from .support import POSTGRES_DSN, FakeClock, fixed_release_signer
from .test_audit_signed import delete_and_recompute

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Roles:
    admin: psycopg.Connection
    schema: str
    service: str
    owner: str

    @property
    def service_dsn(self) -> str:
        return psycopg.conninfo.make_conninfo(POSTGRES_DSN, user=self.service)


@pytest.fixture
def roles() -> Iterator[Roles]:
    suffix = uuid.uuid4().hex[:12]
    admin = psycopg.connect(POSTGRES_DSN, autocommit=True)
    found = Roles(admin, f"kvaudit_{suffix}", f"kv_service_{suffix}", f"kv_audit_{suffix}")
    service = sql.Identifier(found.service)
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(service))
    database = admin.execute("SELECT current_database()").fetchone()
    assert database is not None
    admin.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(database[0]), service))
    try:
        yield found
    finally:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(found.schema)))
        for role in (found.service, found.owner):
            if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        admin.close()


def append(store: PostgresStore, clock: FakeClock, count: int) -> AuditLog:
    log = AuditLog(store, clock)
    log.attach_signer(fixed_release_signer())
    for n in range(count):
        log.record(action="release", outcome="allowed", caller="spiffe://veil/state", detail={"n": n})
    return log


SERVICE_ROLE_ATTACKS = (
    "DELETE FROM kv_audit_events WHERE sequence = 2",
    "UPDATE kv_audit_events SET outcome = 'refused' WHERE sequence = 2",
    "TRUNCATE kv_audit_events",
    "TRUNCATE kv_audit_tip",
    "DELETE FROM kv_audit_signatures",
    "UPDATE kv_audit_tip SET sequence = 1",
    "DELETE FROM kv_audit_tip",
    "DROP TRIGGER kv_audit_no_change ON kv_audit_events",
    "ALTER TABLE kv_audit_events DISABLE TRIGGER ALL",
    "ALTER TABLE kv_audit_tip DISABLE TRIGGER kv_audit_tip_moves_forward",
    "DROP TABLE kv_audit_events CASCADE",
    "DROP FUNCTION kv_audit_append_only() CASCADE",
    "CREATE OR REPLACE FUNCTION kv_audit_tip_forward() RETURNS trigger LANGUAGE plpgsql "
    "AS $$BEGIN RETURN NEW; END$$",
    "ALTER TABLE kv_audit_events OWNER TO CURRENT_USER",
    "SET session_replication_role = replica",
)


@pytest.mark.parametrize("migrate_first", [False, True], ids=["after-first-start", "before-first-start"])
def test_the_service_role_can_only_read_and_append(roles: Roles, migrate_first: bool) -> None:
    clock = FakeClock()
    if migrate_first:
        secure_audit_tables(
            roles.admin, schema=roles.schema, service_role=roles.service, owner_role=roles.owner
        )
        store = PostgresStore(roles.service_dsn, schema=roles.schema)
        append(store, clock, 3)
    else:
        store = PostgresStore(roles.service_dsn, schema=roles.schema)
        append(store, clock, 3)
        store.close()
        secure_audit_tables(
            roles.admin, schema=roles.schema, service_role=roles.service, owner_role=roles.owner
        )
        secure_audit_tables(
            roles.admin, schema=roles.schema, service_role=roles.service, owner_role=roles.owner
        )
        store = PostgresStore(roles.service_dsn, schema=roles.schema)  # restarts over owned tables
    try:
        log = append(store, clock, 2)
        assert log.verify_chain() == 5
        owners = roles.admin.execute(
            "SELECT tablename, tableowner FROM pg_tables "
            "WHERE schemaname = %s AND tablename LIKE 'kv_audit%%'",
            (roles.schema,),
        ).fetchall()
        assert dict(owners) == dict.fromkeys(
            ("kv_audit_events", "kv_audit_signatures", "kv_audit_tip"), roles.owner
        )
        for attack in SERVICE_ROLE_ATTACKS:
            with pytest.raises(StoreError), store.transaction() as tx:
                tx._run(attack)  # type: ignore[attr-defined]  # as the keyvault's own role
        assert log.verify_chain() == 5
        # The database superuser bypasses all of that (triggers off), deletes a release and
        # recomputes the chain: the tip signatures do not follow.
        admin_store = PostgresStore(POSTGRES_DSN, schema=roles.schema)
        try:
            delete_and_recompute(admin_store, 2, keep_signatures=False)
        finally:
            admin_store.close()
        restarted = AuditLog(store, clock)
        restarted.attach_signer(fixed_release_signer())
        with pytest.raises(AuditChainError, match="no release-key signature"):
            restarted.verify_chain()
        with pytest.raises(AuditChainError):
            log.list_events()
    finally:
        store.close()


def test_the_owner_must_be_apart_from_the_service_role(roles: Roles) -> None:
    with pytest.raises(AuditOwnerError):
        secure_audit_tables(
            roles.admin, schema=roles.schema, service_role=roles.service, owner_role=roles.service
        )
    roles.admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(roles.owner)))
    roles.admin.execute(
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles.owner), sql.Identifier(roles.service))
    )
    with pytest.raises(AuditOwnerError, match="can act as"):
        secure_audit_tables(
            roles.admin, schema=roles.schema, service_role=roles.service, owner_role=roles.owner
        )
