"""Which PostgreSQL target and databases a report command talks to, and the errors that are the
operator's to fix (exit code 2) rather than the server's (exit code 1)."""

from __future__ import annotations

import argparse
import re
from urllib.parse import unquote, urlsplit

from sqlalchemy import text

from ..config import Config, PostgresTargetConfig
from ..errors import PgcacheError
from ..postgres.engine import PostgresTarget

__all__ = ["ReportInputError", "choose_target", "is_privilege_error", "privilege_hint", "report_databases"]


class ReportInputError(PgcacheError):
    """The command's input is wrong (unknown target, database or table; a refused statement)."""


def is_privilege_error(e: Exception) -> bool:
    """The server refused for lack of a privilege (SQLSTATE 42501, as describe_error names it)."""
    return "(SQLSTATE 42501)" in str(e)


def privilege_hint(args: argparse.Namespace, target: PostgresTargetConfig) -> str:
    """What to grant, in SQL the operator can paste (the role is the DSN's user)."""
    role = urlsplit(target.resolved_dsn()).username or "<exporter role>"
    role = unquote(role)
    quoted = '"' + role.replace('"', '""') + '"' if not re.fullmatch(r"[a-z_][a-z0-9_]*", role) else role
    command = getattr(args, "command", None)
    if command == "explain":
        writes = " and INSERT, UPDATE, DELETE" if getattr(args, "allow_writes", False) else ""
        return (
            f"explain needs, beyond pg_monitor, SELECT{writes} on every table the statement reads "
            "(EXPLAIN checks privileges even without --analyze). Grant it, e.g.:\n"
            f"  GRANT SELECT ON ALL TABLES IN SCHEMA public TO {quoted};\n"
            f"  or, on PostgreSQL 14+: GRANT pg_read_all_data TO {quoted};"
        )
    if command == "analyze-tables":
        return (f"analyze-tables needs to own the tables, or on PostgreSQL 17+: "
                f"GRANT pg_maintain TO {quoted};")
    return f"the reports need pg_monitor: GRANT pg_monitor TO {quoted};"


def choose_target(config: Config, name: str | None) -> PostgresTargetConfig:
    """`--target NAME`, else the first configured PostgreSQL target."""
    if not config.postgres:
        raise ReportInputError(
            "no PostgreSQL target configured: give --postgres-dsn DSN or --config.file FILE "
            "(or set PGCACHE_POSTGRES_DSN)"
        )
    if name is None:
        return config.postgres[0]
    for t in config.postgres:
        if t.name == name:
            return t
    known = ", ".join(t.name for t in config.postgres)
    raise ReportInputError(f"--target {name}: no such PostgreSQL target (configured: {known})")


async def check_database(target: PostgresTarget, datname: str, statement_timeout: float) -> None:
    async with target.session(statement_timeout=statement_timeout) as conn:
        found = (await conn.execute(
            text("SELECT datallowconn FROM pg_database WHERE datname = :d"), {"d": datname}
        )).scalar()
    if found is None:
        raise ReportInputError(f"--database {datname}: no such database on target {target.name}")
    if not found:
        raise ReportInputError(f"--database {datname}: database does not allow connections (target {target.name})")


async def report_databases(target: PostgresTarget, datname: str | None, statement_timeout: float) -> list[str]:
    """`--database DB` (checked to exist), else every database the target's config watches."""
    if datname is not None:
        await check_database(target, datname, statement_timeout)
        return [datname]
    return await target.databases(statement_timeout)
