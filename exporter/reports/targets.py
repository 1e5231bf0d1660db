"""Which PostgreSQL target and databases a report command talks to, and the errors that are the
operator's to fix (exit code 2) rather than the server's (exit code 1)."""

from __future__ import annotations

from sqlalchemy import text

from ..config import Config, PostgresTargetConfig
from ..errors import PgcacheError
from ..postgres.engine import PostgresTarget

__all__ = ["ReportInputError", "choose_target", "report_databases"]


class ReportInputError(PgcacheError):
    """The command's input is wrong (unknown target, database or table; a refused statement)."""


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
