"""Hand the keyvault's audit tables to an owner role the service cannot act as (PostgreSQL).

Run once per deployment by a database administrator, before or after the keyvault's first
start (it creates what is missing)::

    python -m veil.services.keyvault.audit_owner --dsn postgresql://admin@db/veil \\
        --schema veil_keyvault --service-role veil_keyvault --owner-role veil_keyvault_audit

Afterwards the owner role (NOLOGIN) owns the schema, the audit tables and their trigger
functions; the service role keeps USAGE and CREATE on the schema (it creates and owns its other
tables), SELECT and INSERT on events and signatures, and SELECT, INSERT and UPDATE on the tip
row (the trigger lets it move forward only). It can no longer drop or disable the triggers,
TRUNCATE, DELETE, or drop the tables (the schema owner could). The service role must not be a
member of the owner role; this refuses to proceed if it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg
from psycopg import sql

from veil.services.keyvault.store import GENESIS_HASH
from veil.services.keyvault.store_postgres import AUDIT_DDL, AUDIT_FUNCTIONS, AUDIT_TABLES, DEFAULT_SCHEMA

_APPEND_ONLY = ("kv_audit_events", "kv_audit_signatures")


class AuditOwnerError(Exception):
    """The migration cannot give the audit tables a separate owner."""


def secure_audit_tables(conn: psycopg.Connection, *, schema: str, service_role: str, owner_role: str) -> None:
    """Create (if missing) and hand over the audit tables in one transaction on ``conn`` (an admin)."""
    if service_role == owner_role:
        raise AuditOwnerError("the audit owner role must differ from the service role")
    with conn.transaction():
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner_role,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner_role)))
        member = conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (service_role, owner_role)).fetchone()
        if member is not None and member[0]:
            raise AuditOwnerError(f"role {service_role!r} can act as {owner_role!r}: revoke that membership")
        owner, service, schema_id = (sql.Identifier(n) for n in (owner_role, service_role, schema))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
        conn.execute("SELECT set_config('search_path', %s, true)", (schema,))
        for statement in AUDIT_DDL:
            conn.execute(statement.encode("utf-8"))
        conn.execute(
            "INSERT INTO kv_audit_tip (id, sequence, hash) VALUES (1, 0, %s) ON CONFLICT (id) DO NOTHING",
            (GENESIS_HASH,),
        )
        # The schema's owner may drop any table in it: the service role must not own it.
        conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(schema_id, owner))
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(schema_id, service))
        for table in AUDIT_TABLES:
            name = sql.Identifier(table)
            conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(name, owner))
            conn.execute(sql.SQL("REVOKE ALL ON TABLE {} FROM PUBLIC, {}").format(name, service))
        for table in _APPEND_ONLY:
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT ON TABLE {} TO {}").format(sql.Identifier(table), service)
            )
        # UPDATE (also needed for SELECT ... FOR UPDATE) moves the tip; its trigger allows forward only.
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON TABLE kv_audit_tip TO {}").format(service))
        for function in AUDIT_FUNCTIONS:
            conn.execute(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(sql.SQL(function), owner))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="an administrator's connection string")
    parser.add_argument("--schema", default=DEFAULT_SCHEMA)
    parser.add_argument("--service-role", required=True, help="the role the keyvault connects as")
    parser.add_argument("--owner-role", required=True, help="the audit tables' owner (created NOLOGIN)")
    args = parser.parse_args(argv)
    try:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            secure_audit_tables(
                conn, schema=args.schema, service_role=args.service_role, owner_role=args.owner_role
            )
    except (psycopg.Error, AuditOwnerError) as exc:
        print(f"audit_owner: {exc}", file=sys.stderr)
        return 1
    print(
        f"audit tables in {args.schema!r} now belong to {args.owner_role!r}; {args.service_role!r} may append"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
