"""`analyze-tables TABLE...`: ANALYZE the given tables (the seed design's
optimize_table_statistics), then judge their indexes by the unused-index rule.

Names are resolved by the server (`to_regclass`, the same rules as in SQL: unquoted names fold
to lower case, `"MixedCase"` keeps its case, `schema.table` qualifies) and only the server's own
quoting of the result (`format('%I.%I')`) reaches the ANALYZE statement. Every name is checked
before anything runs. ANALYZE is allowed in a read-only transaction, but its statistics are kept
only if the transaction commits, so this is the one command that commits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ..postgres.engine import PostgresTarget, describe_error
from .indexes import IndexVerdict, UnusedRule, index_verdicts, verdict_table
from .render import format_ms
from .targets import ReportInputError, check_database

__all__ = ["AnalyzedTable", "AnalyzeTablesReport", "analyze_tables", "analyzed_text"]


def _resolve_sql(server_version_num: int) -> str:
    # Who may ANALYZE: the owner (or a member of its role), the database owner, a superuser;
    # from 17 on, whoever holds MAINTAIN on the table.
    allowed = (
        "has_table_privilege(c.oid, 'MAINTAIN')" if server_version_num >= 170000 else
        "pg_has_role(c.relowner, 'USAGE') OR pg_has_role(d.datdba, 'USAGE')"
    )
    return f"""
SELECT c.oid, c.relkind::text AS relkind, format('%I.%I', n.nspname, c.relname) AS qualified, {allowed} AS allowed
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_database d ON d.datname = current_database()
WHERE c.oid = to_regclass(:name)
"""


_ANALYZABLE = {"r": "table", "m": "materialized view", "p": "partitioned table", "f": "foreign table"}
_KINDS = {"v": "a view", "i": "an index", "I": "a partitioned index", "S": "a sequence",
          "c": "a composite type", "t": "a TOAST table"}


@dataclass(frozen=True)
class AnalyzedTable:
    table: str  # as the server names it, quoted where needed
    duration_ms: float


@dataclass(frozen=True)
class AnalyzeTablesReport:
    database: str
    analyzed: list[AnalyzedTable]
    indexes: list[IndexVerdict]


async def analyze_tables(
    target: PostgresTarget, names: list[str], *, database: str | None, rule: UnusedRule, statement_timeout: float
) -> AnalyzeTablesReport:
    db = database or target.default_database
    if database is not None:
        await check_database(target, database, statement_timeout)
    resolved: list[tuple[int, str]] = []
    async with target.session(db, statement_timeout=statement_timeout) as conn:
        version = target.server_version_num or 0
        for name in names:
            try:
                row = (await conn.execute(text(_resolve_sql(version)), {"name": name})).first()
            except DBAPIError as e:
                # 42602 invalid name syntax (a name that is not one, e.g. 'x; DROP TABLE y').
                raise ReportInputError(
                    f"table {name!r}: not a valid table name in database {db} ({describe_error(e)}); "
                    'write table or schema.table, with "double quotes" around mixed-case names'
                ) from None
            if row is None:
                raise ReportInputError(f"table {name!r}: no such table in database {db} (target {target.name})")
            oid, relkind, qualified, allowed = row
            if relkind not in _ANALYZABLE:
                raise ReportInputError(f"table {name!r}: {qualified} is {_KINDS.get(relkind, 'not a table')}, not a table")
            if not allowed:
                raise ReportInputError(
                    f"table {name!r}: the role of this DSN may not ANALYZE {qualified} in database {db} "
                    "(it needs to own the table or the database"
                    + (", or hold MAINTAIN on it)" if version >= 170000 else ", or be a superuser)")
                )
            if oid not in {o for o, _ in resolved}:
                resolved.append((oid, qualified))
        analyzed: list[AnalyzedTable] = []
        for _, qualified in resolved:
            start = time.perf_counter()
            await conn.exec_driver_sql(f"ANALYZE {qualified}")  # quoted by the server
            analyzed.append(AnalyzedTable(qualified, (time.perf_counter() - start) * 1000))
        await conn.commit()
    async with target.session(db, statement_timeout=statement_timeout) as conn:
        verdicts = await index_verdicts(conn, target.server_version_num or 0, db,
                                        {o for o, _ in resolved}, rule)
    return AnalyzeTablesReport(db, analyzed, verdicts)


def analyzed_text(report: AnalyzeTablesReport, width: int | None = None) -> str:
    lines = [f"ANALYZE {a.table}: {format_ms(a.duration_ms)}\n" for a in report.analyzed]
    return "".join(lines) + "\n" + verdict_table(report.indexes, width)
