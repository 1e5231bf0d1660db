"""The generic path: run a definition's queries and turn their rows into exposition text.

Rows are read with the driver (asyncpg) directly: no bind-parameter parsing of the SQL (a user's
`'10:00'::time` stays as written) and no per-row objects beyond asyncpg's records. Each row's label
block is escaped once and shared by every family the row feeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from ..collector import CollectResult
from ..config import CollectorSettings
from ..definitions import Definition, MetricColumn, Query
from ..errors import QueryError
from ..families import Family, label_block
from .collector import PostgresCollector
from .engine import SQL_MARK, PostgresTarget

__all__ = ["DefinitionCollector", "Rendered", "count_series", "render_rows", "run_query", "sql_for"]

EXTENSIONS_SQL = """
SELECT e.extname, e.extversion, quote_ident(n.nspname) AS schema
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
"""

Extensions = Mapping[str, tuple[str, str]]  # name -> (version, quoted schema)


async def driver(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one, inside the session's transaction."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection  # type: ignore[return-value]


async def extensions(conn: AsyncConnection) -> dict[str, tuple[str, str]]:
    rows = await (await driver(conn)).fetch(SQL_MARK + EXTENSIONS_SQL)
    return {r["extname"]: (r["extversion"], r["schema"]) for r in rows}


async def run_query(
    conn: AsyncConnection, sql: str, *args: Any
) -> tuple[list[str], list[asyncpg.Record]]:
    """(column names, rows). The names come from the statement, so they are known (and checked)
    even when there is no row."""
    apg = await driver(conn)
    stmt = await apg.prepare(SQL_MARK + sql)
    names = [a.name for a in stmt.get_attributes()]
    return names, await stmt.fetch(*args)


def sql_for(query: Query, server_version_num: int, exts: Extensions) -> str | None:
    variant = query.variant(server_version_num, exts)
    if variant is None:
        return None
    sql = variant.query
    if variant.extension is not None:
        sql = sql.replace("@extschema@", exts[variant.extension.name][1])
    return sql


@dataclass
class Rendered:
    families: list[Family]
    dropped: int  # series cut by the limit


def _ranked(rows: Sequence[Any], by: int, label_idx: Sequence[int], limit: int) -> tuple[list[Any], list[Any]]:
    """Top `limit` rows by column `by` (descending, NULL last), ties by label values."""
    def key(r: Any) -> tuple[bool, float, tuple[str, ...]]:
        v = r[by]
        return (v is None, -float(v) if v is not None else 0.0, tuple(str(r[i]) for i in label_idx))

    ranked = sorted(rows, key=key)
    return ranked[:limit], ranked[limit:]


def render_rows(
    definition: Definition,
    query: Query,
    columns: Sequence[str],
    rows: Sequence[Any],
    fixed: Sequence[str],
    *,
    server_version_num: int,
    limit: int | None = None,
    labels: Sequence[str] | None = None,
    skip: frozenset[str] = frozenset(),
    keep_database: Callable[[str], bool] | None = None,
    where: str = "",
) -> Rendered:
    """Rows of one query -> families. `fixed` are the values of the definition's fixed labels
    (target, and datname per database). `labels` narrows the query's labels (activity).
    `skip` leaves families out by name. Raises QueryError naming the collector and the column
    when the result does not have the columns the definition maps."""
    where = f"{where}collector {definition.name}"
    if query.name != "main":
        where += f", query {query.name}"
    index = {c: i for i, c in enumerate(columns)}
    label_names = list(query.labels if labels is None else labels)
    metrics: list[MetricColumn] = [
        m for m in query.metrics
        if m.name not in skip and (m.min_version is None or server_version_num >= m.min_version)
    ]
    wanted = label_names + [c for m in metrics for c in (m.column, *m.labels)]
    if query.limit is not None and limit is not None:
        wanted.append(query.limit.by)
    if query.keep is not None:
        wanted.append(query.keep)
    missing = [c for c in dict.fromkeys(wanted) if c not in index]
    if missing:
        raise QueryError(
            f"{where}: column {missing[0]!r} is not in the query's result "
            f"(it has: {', '.join(columns) or 'no columns'})"
        )
    fixed_names = list(definition.fixed_labels())
    label_idx = [index[c] for c in label_names]

    if query.database_label is not None and keep_database is not None:
        di = index[query.database_label]
        rows = [r for r in rows if r[di] is not None and keep_database(str(r[di]))]

    plain = [m for m in metrics if m.aggregate is None]
    summed = [m for m in metrics if m.aggregate == "sum"]
    fams = {m.name: Family(m.name, m.type, m.help) for m in metrics}
    fixed_block = label_block(fixed_names, fixed)

    # Aggregates cover every row, before the limit.
    for m in summed:
        ci = index[m.column]
        total = 0.0
        for r in rows:
            v = r[ci]
            if v is not None:
                total += _number(v, where, m.column) * m.scale
        fams[m.name].add(fixed_block, _tidy(total))

    kept: Sequence[Any] = rows
    dropped = 0
    if query.keep is not None:
        ki = index[query.keep]
        kept = [r for r in rows if r[ki] is True]
        dropped += _series(plain, index, [r for r in rows if r[ki] is not True])
    if query.limit is not None and limit is not None and len(kept) > limit:
        kept, cut = _ranked(kept, index[query.limit.by], label_idx, limit)
        dropped += _series(plain, index, cut)

    specs = [(fams[m.name], index[m.column], m.scale, m.null_as, [index[x] for x in m.labels], m)
             for m in plain]
    all_names = fixed_names + label_names
    for r in kept:
        values = list(fixed) + ["" if r[i] is None else str(r[i]) for i in label_idx]
        block = label_block(all_names, values)
        for fam, ci, scale, null_as, extra, m in specs:
            v = r[ci]
            if v is None:
                if null_as is None:
                    continue
                v = null_as
            elif scale != 1.0:
                v = _number(v, where, m.column) * scale
            elif type(v) not in (int, float):
                v = _number(v, where, m.column)
            if extra:
                fam.add(label_block(all_names + list(m.labels),
                                    values + ["" if r[i] is None else str(r[i]) for i in extra]), v)
            else:
                fam.add(block, v)
    return Rendered([fams[m.name] for m in metrics], dropped)


def count_series(
    query: Query, columns: Sequence[str], rows: Sequence[Any], server_version_num: int
) -> int:
    """How many series these rows would have given (what a cut of them drops)."""
    metrics = [m for m in query.metrics
               if m.aggregate is None and (m.min_version is None or server_version_num >= m.min_version)]
    return _series(metrics, {c: i for i, c in enumerate(columns)}, rows)


def _series(metrics: Sequence[MetricColumn], index: Mapping[str, int], rows: Sequence[Any]) -> int:
    """Series the rows give for these metric columns: one per value not NULL (or NULL with null_as)."""
    return sum(1 for r in rows for m in metrics if r[index[m.column]] is not None or m.null_as is not None)


def _number(v: object, where: str, column: str) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise QueryError(
            f"{where}: column {column!r} is mapped to a metric but holds {type(v).__name__} "
            f"values, not numbers"
        ) from None


def _tidy(v: float) -> float | int:
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


class DefinitionCollector(PostgresCollector):
    """A collector that is a definition: every query run, every row rendered by the generic path.
    Hand-written collectors subclass it and override `collect_one`, using `rows` and `render`."""

    def __init__(
        self, target: PostgresTarget, settings: CollectorSettings, definition: Definition
    ) -> None:
        super().__init__(target, settings)
        self.definition = definition
        self.name = definition.name  # type: ignore[misc]
        self.per_database = definition.scope == "database"  # type: ignore[misc]
        self.limit: int | None = getattr(settings, "limit", None)
        if self.limit is None and definition.limit is not None:
            self.limit = definition.limit.default
        # (query name, database) -> runs since the query last read its figures, and what it read.
        self._kept: dict[tuple[str, str | None], tuple[int, Rendered]] = {}

    def visit(self, databases: list[str]) -> list[str]:
        return [d for d in databases if self._in_definition(d)]

    def fixed_values(self, datname: str | None) -> list[str]:
        if self.per_database:
            return [self.target, datname or self.pg.default_database]
        return [self.target]

    async def rows(
        self, conn: AsyncConnection, query: Query, exts: Extensions | None, *args: Any
    ) -> tuple[list[str], list[Any]] | None:
        """Run the query's variant for this server; None when no variant applies (the view does
        not exist on this version, or the extension is missing): its families are left out."""
        version = self.pg.server_version_num or 0
        sql = sql_for(query, version, exts or {})
        if sql is None:
            return None
        return await run_query(conn, sql, *args)

    def render(
        self, query: Query, columns: Sequence[str], rows: Sequence[Any], datname: str | None, **kw: Any
    ) -> Rendered:
        return render_rows(
            self.definition, query, columns, rows, self.fixed_values(datname),
            server_version_num=self.pg.server_version_num or 0,
            limit=self.limit if query.limit is not None else None,
            keep_database=self.watches, where=self.where(datname), **kw,
        )

    def params(self, query: Query) -> list[Any]:
        """The query's parameters: `collectors.<name>.<key>`, or the definition's default (user
        queries, whose settings are not in the config)."""
        return [getattr(self.settings, p, self.definition.settings[p].default) for p in query.params]

    def where(self, datname: str | None) -> str:
        return f"target {self.target}, database {datname or self.pg.default_database}: "

    def watches(self, datname: str) -> bool:
        """Whether the target's `databases` selection covers this database."""
        sel = self.pg.cfg.databases
        if not sel.auto_discover:
            return datname == self.pg.default_database and sel.allows(datname)
        return sel.allows(datname) and self._in_definition(datname)

    def _in_definition(self, datname: str) -> bool:
        return not self.definition.databases or any(
            re.search(p, datname) for p in self.definition.databases
        )

    async def collect_one(self, conn: AsyncConnection, datname: str | None) -> CollectResult:
        exts = await extensions(conn) if any(q.needs_extensions() for q in self.definition.queries) else None
        families: list[Any] = []
        dropped = 0
        for query in self.definition.queries:
            out = await self._run(conn, query, exts, datname)
            if out is not None:
                families += out.families
                dropped += out.dropped
        return CollectResult(families, dropped=dropped)

    async def _run(
        self, conn: AsyncConnection, query: Query, exts: Extensions | None, datname: str | None
    ) -> Rendered | None:
        key = (query.name, datname)
        kept = self._kept.get(key)
        if kept is not None and kept[0] < query.every:
            self._kept[key] = (kept[0] + 1, kept[1])
            return kept[1]
        got = await self.rows(conn, query, exts, *self.params(query))
        if got is None:
            return None
        out = self.render(query, got[0], got[1], datname)
        if query.every > 1:
            self._kept[key] = (1, out)
        return out
