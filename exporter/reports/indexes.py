"""`report unused-indexes` and `report redundant-indexes`: the indexes worth a look, by the
indexes collector's SQL (`indexes_sql`, `STATS_AGE_SQL`) and rules (`is_unused_candidate`,
`redundant_indexes`), each with its reason in words and a `DROP INDEX CONCURRENTLY` statement to
review. Nothing here drops anything."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..postgres.engine import PostgresTarget
from ..postgres.indexes import (
    STATS_AGE_SQL,
    IndexRow,
    indexes_sql,
    is_unused_candidate,
    redundant_indexes,
)
from .render import Column, format_age, format_bytes, format_count, render_table
from .targets import report_databases

__all__ = [
    "IndexVerdict",
    "RedundantIndex",
    "UnusedIndex",
    "UnusedRule",
    "index_rows",
    "index_verdicts",
    "redundant_indexes_report",
    "redundant_table",
    "unused_indexes",
    "unused_table",
    "verdict_table",
]

# Identifiers quoted by the server (quote_ident semantics, via format's %I), definitions as
# pg_dump would write them.
_DETAILS_SQL = """
SELECT c.oid, format('DROP INDEX CONCURRENTLY %I.%I;', n.nspname, c.relname) AS drop_statement,
       pg_get_indexdef(c.oid) AS definition
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY(:oids)
"""


@dataclass(frozen=True)
class UnusedRule:
    """The collector's thresholds (collectors.indexes), possibly overridden by flags."""

    min_stats_age: float
    min_size: int


@dataclass(frozen=True)
class IndexVerdict:
    """One index judged by the unused-index rule, with the reason in words either way."""

    datname: str
    schema: str
    table: str
    index: str
    size_bytes: int | None
    scans: int
    stats_age_seconds: float | None
    unused_candidate: bool
    reason: str
    drop_statement: str | None  # for candidates only


@dataclass(frozen=True)
class UnusedIndex:
    datname: str
    schema: str
    table: str
    index: str
    size_bytes: int
    scans: int
    stats_age_seconds: float
    reason: str
    definition: str
    drop_statement: str


@dataclass(frozen=True)
class RedundantIndex:
    datname: str
    schema: str
    table: str
    index: str
    size_bytes: int | None
    scans: int
    covered_by: str
    definition: str
    covered_by_definition: str
    drop_statement: str


def judge(row: IndexRow, stats_age: float | None, rule: UnusedRule) -> tuple[bool, str]:
    """(candidate?, why) in the operator's words."""
    if is_unused_candidate(row, stats_age, rule.min_stats_age, rule.min_size):
        assert stats_age is not None and row.size_bytes is not None
        return True, (
            f"no scans since statistics began {format_age(stats_age)} ago; "
            f"{format_bytes(row.size_bytes)} (at least {format_bytes(rule.min_size)}); "
            "backs no constraint; valid"
        )
    if not row.indisvalid:
        return False, "invalid (a failed CREATE INDEX CONCURRENTLY): drop it or REINDEX it"
    if row.idx_scan > 0:
        return False, f"in use: {row.idx_scan:,} scans"
    if row.enforces_constraint:
        kind = "primary key" if row.indisprimary else "exclusion" if row.indisexclusion else "unique"
        return False, f"no scans, but it enforces a {kind} constraint"
    if row.indisreplident:
        return False, "no scans, but it is the table's replica identity"
    if stats_age is None or stats_age < rule.min_stats_age:
        return False, (
            f"no scans, but statistics are only {format_age(stats_age)} old "
            f"(needs {format_age(rule.min_stats_age)})"
        )
    if row.size_bytes is None:
        return False, "no scans; size unknown (locked by another session)"
    return False, f"no scans, but only {format_bytes(row.size_bytes)} (under {format_bytes(rule.min_size)})"


async def index_rows(conn: AsyncConnection, version: int) -> tuple[list[IndexRow], float | None]:
    rows = [IndexRow.from_mapping(m) for m in (await conn.execute(text(indexes_sql(version)))).mappings()]
    stats_age = (await conn.execute(text(STATS_AGE_SQL))).scalar()
    return rows, stats_age


async def index_details(conn: AsyncConnection, oids: Collection[int]) -> dict[int, tuple[str, str]]:
    """indexrelid -> (DROP INDEX CONCURRENTLY statement, CREATE INDEX definition)."""
    if not oids:
        return {}
    found = await conn.execute(text(_DETAILS_SQL), {"oids": sorted(oids)})
    return {oid: (drop, definition) for oid, drop, definition in found}


async def index_verdicts(
    conn: AsyncConnection, version: int, datname: str, relids: Collection[int], rule: UnusedRule
) -> list[IndexVerdict]:
    """Every index of the tables `relids`, candidates first, then by size."""
    rows, stats_age = await index_rows(conn, version)
    rows = [r for r in rows if r.relid in relids]
    judged = [(r, *judge(r, stats_age, rule)) for r in rows]
    details = await index_details(conn, [r.indexrelid for r, cand, _ in judged if cand])
    out = [
        IndexVerdict(datname, r.schema, r.table, r.index, r.size_bytes, r.idx_scan, stats_age,
                     cand, why, details[r.indexrelid][0] if cand else None)
        for r, cand, why in judged
    ]
    out.sort(key=lambda v: (not v.unused_candidate, -(v.size_bytes or 0), v.schema, v.table, v.index))
    return out


async def unused_indexes(
    target: PostgresTarget, *, database: str | None, rule: UnusedRule, limit: int, statement_timeout: float
) -> tuple[list[UnusedIndex], dict[str, float | None]]:
    """Unused-index candidates, biggest first; and each database's statistics age (a database
    whose statistics are younger than the rule's minimum can have no candidate)."""
    out: list[UnusedIndex] = []
    ages: dict[str, float | None] = {}
    for db in await report_databases(target, database, statement_timeout):
        async with target.session(db, statement_timeout=statement_timeout) as conn:
            rows, stats_age = await index_rows(conn, target.server_version_num or 0)
            ages[db] = stats_age
            candidates = [r for r in rows if judge(r, stats_age, rule)[0]]
            details = await index_details(conn, [r.indexrelid for r in candidates])
        for r in candidates:
            assert r.size_bytes is not None and stats_age is not None
            drop, definition = details[r.indexrelid]
            out.append(UnusedIndex(
                db, r.schema, r.table, r.index, r.size_bytes, r.idx_scan, stats_age,
                judge(r, stats_age, rule)[1], definition, drop,
            ))
    out.sort(key=lambda u: (-u.size_bytes, u.datname, u.schema, u.table, u.index))
    return (out[:limit] if limit > 0 else out), ages


async def redundant_indexes_report(
    target: PostgresTarget, *, database: str | None, limit: int, statement_timeout: float
) -> list[RedundantIndex]:
    """Indexes another index on the same table covers (leading key columns, same predicate)."""
    out: list[RedundantIndex] = []
    for db in await report_databases(target, database, statement_timeout):
        async with target.session(db, statement_timeout=statement_timeout) as conn:
            rows, _ = await index_rows(conn, target.server_version_num or 0)
            covered = redundant_indexes(rows)
            by_oid = {r.indexrelid: r for r in rows}
            details = await index_details(
                conn, {*covered, *(w.indexrelid for w in covered.values())}
            )
        for oid, wide in covered.items():
            r = by_oid[oid]
            out.append(RedundantIndex(
                db, r.schema, r.table, r.index, r.size_bytes, r.idx_scan, wide.index,
                details[oid][1], details[wide.indexrelid][1], details[oid][0],
            ))
    out.sort(key=lambda x: (-(x.size_bytes or 0), x.datname, x.schema, x.table, x.index))
    return out[:limit] if limit > 0 else out


# The columns every index table starts with, and the ones it ends with.
_SIZE = Column("SIZE", lambda r: format_bytes(r.size_bytes), ">")
_SCANS = Column("SCANS", lambda r: format_count(r.scans), ">")
_DATABASE = Column("DATABASE", lambda r: r.datname, flex=True, min_width=8)
_INDEX = Column("INDEX", lambda r: f"{r.schema}.{r.index}", flex=True, min_width=16)
_TABLE = Column("TABLE", lambda r: r.table, flex=True, min_width=10)
_WHY = Column("WHY", lambda r: r.reason, flex=True, min_width=30)


def _to_review(drops: Sequence[str]) -> str:
    """The DROP statements to review under a table; the commands themselves never drop."""
    return "\nTo review (this command drops nothing):\n" + "".join(f"{d}\n" for d in drops) if drops else ""


def unused_table(rows: Sequence[UnusedIndex], width: int | None = None) -> str:
    if not rows:
        return ""
    table = render_table(rows, [_SIZE, _SCANS, _DATABASE, _INDEX, _TABLE, _WHY], width)
    return table + _to_review([f"{r.drop_statement}  -- {r.datname}" for r in rows])


def verdict_table(rows: Sequence[IndexVerdict], width: int | None = None) -> str:
    if not rows:
        return "no indexes on these tables\n"
    unused = Column("UNUSED", lambda r: "yes" if r.unused_candidate else "no")
    table = render_table(rows, [_SIZE, _SCANS, unused, _INDEX, _TABLE, _WHY], width)
    return table + _to_review([r.drop_statement for r in rows if r.drop_statement])


def redundant_table(rows: Sequence[RedundantIndex], width: int | None = None) -> str:
    if not rows:
        return "no redundant indexes\n"
    table = render_table(rows, [
        _SIZE, _SCANS, _DATABASE, _INDEX,
        Column("COVERED BY", lambda r: r.covered_by, flex=True, min_width=16),
        Column("DEFINITION", lambda r: r.definition, flex=True, min_width=30),
    ], width)
    return table + _to_review([f"{r.drop_statement}  -- covered by {r.covered_by}" for r in rows])
