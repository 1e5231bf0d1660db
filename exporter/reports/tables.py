"""`report table-sizes`: the biggest tables (heap, indexes, TOAST) in the watched databases, with
the tables collector's SQL (definitions/tables.yaml) and its ranking (total size, locked last)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..definitions import definition
from ..postgres.engine import PostgresTarget
from ..postgres.queries import run_query, sql_for
from .render import Column, format_bytes, format_count, render_table
from .targets import report_databases

__all__ = ["TableSize", "table_sizes", "table_sizes_table"]


@dataclass(frozen=True)
class TableSize:
    datname: str
    schema: str
    table: str
    total_bytes: int | None  # None: locked by another session (AccessExclusiveLock), not read
    heap_bytes: int | None
    indexes_bytes: int | None
    toast_bytes: int | None
    live_rows: int
    dead_rows: int
    seq_scans: int
    index_scans: int | None  # None: the table has no index

    @classmethod
    def from_row(cls, datname: str, r: Mapping[str, Any]) -> TableSize:
        return cls(
            datname=datname, schema=r["schema"], table=r["table"], total_bytes=r["total_bytes"],
            heap_bytes=r["heap_bytes"], indexes_bytes=r["indexes_bytes"],
            toast_bytes=r["toast_bytes"], live_rows=r["live_rows"] or 0,
            dead_rows=r["dead_rows"] or 0, seq_scans=r["seq_scan"] or 0, index_scans=r["idx_scan"],
        )


def _rank(t: TableSize) -> tuple[int, str, str, str]:
    return (-(t.total_bytes if t.total_bytes is not None else -1), t.datname, t.schema, t.table)


async def table_sizes(
    target: PostgresTarget, *, database: str | None, limit: int, statement_timeout: float
) -> list[TableSize]:
    """The `limit` biggest tables across the databases (0: all), biggest first."""
    out: list[TableSize] = []
    query = definition("tables").query("tables")
    for db in await report_databases(target, database, statement_timeout):
        async with target.session(db, statement_timeout=statement_timeout) as conn:
            sql = sql_for(query, target.server_version_num or 0, {})
            assert sql is not None
            _, rows = await run_query(conn, sql)
        out += [TableSize.from_row(db, r) for r in rows]
    out.sort(key=_rank)
    return out[:limit] if limit > 0 else out


def table_sizes_table(rows: list[TableSize], width: int | None = None) -> str:
    if not rows:
        return "no user tables\n"
    return render_table(rows, [
        Column("TOTAL", lambda r: format_bytes(r.total_bytes), ">"),
        Column("TABLE", lambda r: format_bytes(r.heap_bytes), ">"),
        Column("INDEXES", lambda r: format_bytes(r.indexes_bytes), ">"),
        Column("TOAST", lambda r: format_bytes(r.toast_bytes), ">"),
        Column("LIVE ROWS", lambda r: format_count(r.live_rows), ">"),
        Column("DEAD ROWS", lambda r: format_count(r.dead_rows), ">"),
        Column("SEQ SCANS", lambda r: format_count(r.seq_scans), ">"),
        Column("IDX SCANS", lambda r: format_count(r.index_scans), ">"),
        Column("DATABASE", lambda r: r.datname, flex=True, min_width=8),
        Column("NAME", lambda r: f"{r.schema}.{r.table}", flex=True, min_width=16),
    ], width)
