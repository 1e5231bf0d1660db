"""`report slow-queries`: the statements that cost the most execution time, from
pg_stat_statements, with the same SQL as the statements collector (`statements_sql`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import QueryError
from ..postgres.engine import PostgresTarget, describe_error, is_own_statement
from ..postgres.statements import (
    EXTENSION_SQL,
    HOW_TO_ENABLE,
    StatementRow,
    parse_extversion,
    scrub_secrets,
    select_statements,
    statement_texts_sql,
    statements_sql,
)
from .render import Column, format_count, format_ms, one_line, render_table

__all__ = ["SlowQuery", "slow_queries", "slow_queries_table"]


@dataclass(frozen=True)
class SlowQuery:
    datname: str
    user: str
    queryid: int | None
    calls: int
    total_exec_ms: float
    mean_exec_ms: float
    rows: int
    hit_percent: float | None  # shared buffer hits / (hits + reads); None: no block touched
    shared_blks_hit: int
    shared_blks_read: int
    temp_blks_written: int
    query: str | None  # the normalized text ($1, $2... for constants); None: not visible to us

    @classmethod
    def from_row(cls, r: StatementRow, query: str | None) -> SlowQuery:
        blocks = r.shared_blks_hit + r.shared_blks_read
        return cls(
            datname=r.datname, user=r.username, queryid=r.queryid, calls=int(r.calls),
            total_exec_ms=r.exec_ms, mean_exec_ms=r.exec_ms / r.calls if r.calls else 0.0,
            rows=int(r.rows), hit_percent=100 * r.shared_blks_hit / blocks if blocks else None,
            shared_blks_hit=int(r.shared_blks_hit), shared_blks_read=int(r.shared_blks_read),
            temp_blks_written=int(r.temp_blks_written), query=query,
        )


async def slow_queries(
    target: PostgresTarget, *, database: str | None, limit: int, statement_timeout: float,
    include_own: bool = False,
) -> list[SlowQuery]:
    """The top `limit` statements by total execution time (all databases, or `database`'s); the
    exporter's own (its role's) left out unless `include_own`."""
    db = target.default_database
    async with target.session(statement_timeout=statement_timeout) as conn:
        ext = (await conn.execute(text(EXTENSION_SQL))).mappings().first()
        if ext is None:
            raise QueryError(
                f"target {target.name}, database {db}: pg_stat_statements is not installed in the "
                f"database the DSN names: {HOW_TO_ENABLE.format(db=db)}"
            )
        schema = ext["schema"]
        try:
            result = await conn.execute(text(statements_sql(schema, parse_extversion(ext["extversion"]))))
        except DBAPIError as e:
            if getattr(getattr(e.orig, "__cause__", None), "sqlstate", None) == "55000":
                raise QueryError(
                    f"target {target.name}, database {db}: pg_stat_statements is not loaded: "
                    + HOW_TO_ENABLE.format(db=db)
                ) from None
            raise QueryError(f"target {target.name}, database {db}: {describe_error(e)}") from None
        rows = [StatementRow.from_mapping(m) for m in result.mappings()]
        if database is not None:
            rows = [r for r in rows if r.datname == database]
        if not include_own and target.privileges is not None:
            rows = await _without_own(conn, schema, rows, target.privileges.role_oid)
        chosen = select_statements(rows, (), limit if limit > 0 else len(rows))
        ids = sorted({r.queryid for r in chosen if r.queryid is not None})
        texts: dict[int, str] = {}
        if ids:
            found = await conn.execute(text(statement_texts_sql(schema)), {"ids": ids})
            # The same scrubbing as the collector's query label: pg_stat_statements keeps
            # CREATE ROLE ... PASSWORD '...' and connection strings verbatim.
            texts = {qid: scrub_secrets(query) for qid, query in found if query is not None}
    return [SlowQuery.from_row(r, texts.get(r.queryid) if r.queryid is not None else None)
            for r in chosen]


async def _without_own(conn: AsyncConnection, schema: str, rows: list[StatementRow],
                       role_oid: int) -> list[StatementRow]:
    """Leave out the exporter's own statements: its role's whose text starts with SQL_MARK (or
    is one its drivers send)."""
    ids = sorted({r.queryid for r in rows if r.userid == role_oid and r.queryid is not None})
    if not ids:
        return rows
    found = await conn.execute(text(statement_texts_sql(schema)), {"ids": ids})
    own = {qid for qid, query in found if is_own_statement(query)}
    return [r for r in rows if not (r.userid == role_oid and r.queryid in own)]


def slow_queries_table(rows: list[SlowQuery], width: int | None = None) -> str:
    if not rows:
        return "no statements recorded by pg_stat_statements\n"
    return render_table(rows, [
        Column("TOTAL", lambda r: format_ms(r.total_exec_ms), ">"),
        Column("MEAN", lambda r: format_ms(r.mean_exec_ms), ">"),
        Column("CALLS", lambda r: format_count(r.calls), ">"),
        Column("ROWS", lambda r: format_count(r.rows), ">"),
        Column("HIT %", lambda r: "-" if r.hit_percent is None else f"{r.hit_percent:.1f}", ">"),
        Column("DATABASE", lambda r: r.datname, flex=True, min_width=8),
        Column("USER", lambda r: r.user, flex=True, min_width=8),
        Column("QUERY", lambda r: one_line(r.query) if r.query is not None else "<not visible>",
               flex=True, min_width=20),
    ], width)
