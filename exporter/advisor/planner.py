"""Ask the planner: the statements that cost the most, each planned generically with and without
each candidate index made hypothetical by HypoPG; or, without HypoPG, the evidence only.

Everything here is read-only. HypoPG's indexes live in the backend's memory (never in the
catalog, never on disk) and work inside a read-only transaction; every run starts and ends with
`hypopg_reset()` so a pooled connection never carries one to another collector.

Generic plans: pg_stat_statements keeps statements with their constants replaced by $1, $2, ...
Each is planned as `PREPARE` + `EXPLAIN EXECUTE name(NULL, ...)` under
`plan_cache_mode = force_generic_plan`, the way that works from PostgreSQL 12 to 18 alike
(`EXPLAIN (GENERIC_PLAN)`, 16+, would need the $n sent through the simple query protocol). A
prepared plan is cached with the indexes that existed when it was made, so each measurement
prepares afresh and deallocates at once.

Partial indexes: with the constants gone, a generic plan can never prove that `is_deleted = $2`
matches an index's `WHERE is_deleted = false`. So every existing partial index is stood in for by
a hypothetical twin with no predicate whose leading columns are the ones its predicate fixes
(`(created_at) WHERE is_published AND NOT is_deleted` -> `(is_published, is_deleted, created_at)`):
the statement gets the benefit of the doubt, and an index the application really uses is not
suggested again.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .candidates import (
    StatementShape,
    TableRef,
    candidate_keys,
    predicate_columns,
    resolve,
    statement_shape,
)

__all__ = [
    "Advice",
    "DatabaseAdvice",
    "SeqScanEvidence",
    "StatementAdvice",
    "TopStatement",
    "advise_database",
    "merge_advice",
    "top_statements",
]

log = logging.getLogger(__name__)

# PostgreSQL's regex dialect: \y is a word boundary.
PLANNABLE = r"^\s*(select|with|update|delete)\y"


@dataclass(frozen=True)
class TopStatement:
    datname: str
    queryid: int
    query: str
    calls: int
    total_ms: float
    db_total_ms: float

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.calls if self.calls else 0.0


def top_statements_sql(schema: str, total_column: str) -> str:
    """The `n` statements of each database that took the most time (only those a planner can
    explain), with the time of all the database's statements for the share."""
    return f"""
WITH s AS (
    -- One queryid can also be a nested statement (EXPLAIN ANALYZE of it, track = all): the
    -- text most calls used is the application's own.
    SELECT dbid, queryid, (array_agg(query ORDER BY calls DESC))[1] AS query, sum(calls)::bigint AS calls,
           sum({total_column})::float8 AS total_ms
    FROM {schema}.pg_stat_statements(true)
    GROUP BY dbid, queryid
), db AS (
    SELECT dbid, sum(total_ms) AS db_total_ms FROM s GROUP BY dbid
), ranked AS (
    SELECT s.*, row_number() OVER (PARTITION BY s.dbid ORDER BY s.total_ms DESC) AS rank
    FROM s WHERE s.query ~* '{PLANNABLE}' AND s.calls > 0
)
SELECT d.datname, r.queryid, r.query, r.calls, r.total_ms, db.db_total_ms
FROM ranked r JOIN db USING (dbid) JOIN pg_database d ON d.oid = r.dbid
WHERE r.rank <= :n
ORDER BY d.datname, r.total_ms DESC
"""


PGSS_SQL = """
SELECT quote_ident(n.nspname) AS schema, e.extversion
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""

HYPOPG_SQL = """
SELECT quote_ident(n.nspname) FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'hypopg'
"""


async def top_statements(conn: AsyncConnection, n: int) -> dict[str, list[TopStatement]] | None:
    """By database name; None when pg_stat_statements is not installed where `conn` is."""
    ext = (await conn.execute(text(PGSS_SQL))).first()
    if ext is None:
        return None
    major, _, minor = str(ext.extversion).partition(".")
    # total_time became total_exec_time in 1.8 (PostgreSQL 13).
    total = "total_exec_time" if (int(major), int(minor or 0)) >= (1, 8) else "total_time"
    out: dict[str, list[TopStatement]] = {}
    for r in (await conn.execute(text(top_statements_sql(ext.schema, total)), {"n": n})).mappings():
        out.setdefault(r["datname"], []).append(TopStatement(
            r["datname"], int(r["queryid"] or 0), r["query"] or "", int(r["calls"]),
            float(r["total_ms"]), float(r["db_total_ms"] or 0.0),
        ))
    return out


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    columns: frozenset[str]
    rows: float
    seq_scan: int
    idx_scan: int
    seq_tup_read: int = 0
    idx_tup_fetch: int = 0

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


@dataclass(frozen=True)
class ExistingIndex:
    name: str
    relid: int
    amname: str
    columns: tuple[str | None, ...]  # None: an expression
    key_defs: tuple[str, ...]
    predicate: str | None


@dataclass
class StatementAdvice:
    statement: TopStatement
    cost_before: float
    cost_after: float

    @property
    def saving(self) -> float:
        return 1.0 - self.cost_after / self.cost_before if self.cost_before > 0 else 0.0


@dataclass
class Advice:
    """One suggested btree index and the statements it would help."""

    datname: str
    schema: str
    table: str
    columns: tuple[str, ...]
    statements: list[StatementAdvice] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The stable `index` label: the key columns, in order."""
        return ",".join(self.columns)

    @property
    def definition(self) -> str:
        cols = ", ".join(quote_ident(c) for c in self.columns)
        return f"CREATE INDEX CONCURRENTLY ON {quote_ident(self.schema)}.{quote_ident(self.table)} ({cols})"

    @property
    def saving(self) -> float:
        """The estimated cut in cost, averaged over the helped statements by their time."""
        weight = sum(s.statement.total_ms for s in self.statements)
        if weight <= 0:
            return max((s.saving for s in self.statements), default=0.0)
        return sum(s.saving * s.statement.total_ms for s in self.statements) / weight

    @property
    def time_share(self) -> float:
        """Share of the database's statement time spent in the statements it would help."""
        total = max((s.statement.db_total_ms for s in self.statements), default=0.0)
        return min(1.0, sum(s.statement.total_ms for s in self.statements) / total) if total > 0 else 0.0


@dataclass
class SeqScanEvidence:
    """Without HypoPG: a large table whose rows are read mostly by sequential scans (more rows
    read by them than fetched through indexes), and the top statements
    whose generic plan scans it sequentially."""

    datname: str
    schema: str
    table: str
    rows: float
    seq_scan: int
    idx_scan: int
    statements: list[TopStatement] = field(default_factory=list)

    @property
    def time_share(self) -> float:
        total = max((s.db_total_ms for s in self.statements), default=0.0)
        return min(1.0, sum(s.total_ms for s in self.statements) / total) if total > 0 else 0.0


@dataclass
class DatabaseAdvice:
    datname: str
    hypopg: bool
    advice: list[Advice] = field(default_factory=list)
    evidence: list[SeqScanEvidence] = field(default_factory=list)
    planned: int = 0
    # Statements the planner refused (no SELECT privilege, a type it cannot infer, ...).
    unplannable: list[tuple[TopStatement, str]] = field(default_factory=list)


def quote_ident(name: str) -> str:
    if name.isidentifier() and name == name.lower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


TABLES_SQL = """
SELECT c.oid, n.nspname AS schema, c.relname AS name, greatest(c.reltuples, 0)::float8 AS rows,
       coalesce(s.seq_scan, 0) AS seq_scan, coalesce(s.idx_scan, 0) AS idx_scan,
       coalesce(s.seq_tup_read, 0) AS seq_tup_read, coalesce(s.idx_tup_fetch, 0) AS idx_tup_fetch,
       ARRAY(SELECT attname FROM pg_attribute
             WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped)::text[] AS columns
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = to_regclass(:name) AND c.relkind IN ('r', 'p', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
"""

INDEXES_SQL = """
SELECT c.relname AS name, i.indrelid AS relid, am.amname,
       ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)::text[] AS columns,
       ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true)
             FROM generate_series(1, i.indnkeyatts) k)::text[] AS key_defs,
       pg_get_expr(i.indpred, i.indrelid) AS predicate
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
WHERE i.indrelid = ANY(CAST(:relids AS oid[])) AND i.indisvalid
"""


# Prepared statement names, unique in the process (a run cut off by its timeout may leave one
# behind in a pooled connection; the next run removes it, see Planner.clean).
_NAMES = itertools.count(1)
PREPARED_PREFIX = "pgcache_advisor_"


class Planner:
    """Generic-plan costs on one connection, through the driver (the statement text goes to the
    server as it is: no client-side parameter parsing of `%` or `:name`)."""

    def __init__(self, conn: AsyncConnection, hypopg_schema: str | None) -> None:
        self.conn = conn
        self.hypopg = hypopg_schema
        self._raw: Any = None

    async def _driver(self) -> Any:
        if self._raw is None:
            raw = await self.conn.get_raw_connection()
            self._raw = raw.driver_connection
        return self._raw

    async def plan(self, sql: str, params: int) -> dict[str, Any]:
        """The generic plan's top node (JSON). Raises the server's error; the transaction is
        kept usable by a savepoint."""
        apg = await self._driver()
        name = f"{PREPARED_PREFIX}{next(_NAMES)}"
        await apg.execute("SAVEPOINT pgcache_advisor")
        prepared = False
        try:
            await apg.execute(f"PREPARE {name} AS {sql}")
            prepared = True
            args = "(" + ", ".join(["NULL"] * params) + ")" if params else ""
            out = await apg.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}{args}")
            await apg.execute("RELEASE SAVEPOINT pgcache_advisor")
        except Exception:
            await apg.execute("ROLLBACK TO SAVEPOINT pgcache_advisor")
            raise
        finally:
            if prepared:  # prepared statements outlive transactions: never leave one behind
                await apg.execute(f"DEALLOCATE {name}")
        doc = json.loads(out) if isinstance(out, str) else out
        plan: dict[str, Any] = doc[0]["Plan"]
        return plan

    async def cost(self, sql: str, params: int) -> float:
        return float((await self.plan(sql, params))["Total Cost"])

    async def hypothetical(self, table: Table, key_defs: Sequence[str]) -> int:
        """A hypothetical btree index (backend memory only: HypoPG never touches the catalog)."""
        apg = await self._driver()
        ddl = f"CREATE INDEX ON {table.qualified} ({', '.join(key_defs)})"
        await apg.execute("SAVEPOINT pgcache_advisor")
        try:
            oid = await apg.fetchval(f"SELECT indexrelid FROM {self.hypopg}.hypopg_create_index($1)", ddl)
            await apg.execute("RELEASE SAVEPOINT pgcache_advisor")
        except Exception:
            await apg.execute("ROLLBACK TO SAVEPOINT pgcache_advisor")
            raise
        return int(oid)

    async def drop(self, oid: int) -> None:
        apg = await self._driver()
        await apg.fetchval(f"SELECT {self.hypopg}.hypopg_drop_index($1)", oid)

    async def clean(self) -> None:
        """What a run cut off by its timeout may have left in this pooled connection: hypothetical
        indexes and prepared statements."""
        apg = await self._driver()
        for (name,) in await apg.fetch(
            "SELECT name FROM pg_prepared_statements WHERE starts_with(name, $1)", PREPARED_PREFIX
        ):
            await apg.execute(f"DEALLOCATE {name}")
        await self.reset()

    async def reset(self) -> None:
        if self.hypopg is not None:
            apg = await self._driver()
            await apg.fetchval(f"SELECT {self.hypopg}.hypopg_reset()")


def _covered(key: tuple[str, ...], existing: Sequence[tuple[str | None, ...]]) -> bool:
    """An existing index (or a partial index's twin) whose leading columns are the key's."""
    for cols in existing:
        head = cols[: len(key)]
        if head == key or set(head) == set(key):
            return True
    return False


def _seq_scanned(plan: dict[str, Any]) -> Iterator[str]:
    if plan.get("Node Type") == "Seq Scan" and "Relation Name" in plan:
        yield str(plan["Relation Name"])
    for child in plan.get("Plans", ()):
        yield from _seq_scanned(child)


@dataclass
class _Prepared:
    statement: TopStatement
    shape: StatementShape
    tables: dict[TableRef, Table]


async def advise_database(
    conn: AsyncConnection,
    datname: str,
    statements: Sequence[TopStatement],
    *,
    min_saving: float,
    min_table_rows: float,
) -> DatabaseAdvice:
    """Plan each statement with and without each candidate; keep the best candidate per
    statement when it cuts the cost by at least `min_saving`."""
    hypopg = (await conn.execute(text(HYPOPG_SQL))).scalar()
    out = DatabaseAdvice(datname, hypopg is not None)
    await conn.execute(text("SELECT set_config('plan_cache_mode', 'force_generic_plan', true)"))

    tables: dict[TableRef, Table | None] = {}
    work: list[_Prepared] = []
    for st in statements:
        shape = statement_shape(st.query)
        if shape is None:
            continue
        for ref in shape.tables:
            if ref not in tables:
                tables[ref] = await _table(conn, ref)
        found = {ref: t for ref in shape.tables if (t := tables[ref]) is not None}
        if found:
            work.append(_Prepared(st, shape, found))

    relids = sorted({t.oid for t in tables.values() if t is not None})
    indexes: dict[int, list[ExistingIndex]] = {}
    if relids:
        for r in (await conn.execute(text(INDEXES_SQL), {"relids": relids})).mappings():
            ix = ExistingIndex(r["name"], int(r["relid"]), r["amname"], tuple(r["columns"]),
                               tuple(r["key_defs"]), r["predicate"])
            indexes.setdefault(ix.relid, []).append(ix)

    planner = Planner(conn, hypopg)
    await planner.clean()
    try:
        by_oid = {t.oid: t for t in tables.values() if t is not None}
        keys_by_table = await _twins(planner, by_oid, indexes) if hypopg else _existing_keys(indexes)
        advised: list[tuple[Table, tuple[str, ...], StatementAdvice]] = []
        scans: dict[int, SeqScanEvidence] = {}
        for item in work:
            st = item.statement
            try:
                baseline = await planner.plan(st.query, item.shape.params)
            except Exception as e:
                out.unplannable.append((st, _one_line(e)))
                continue
            out.planned += 1
            before = float(baseline["Total Cost"])
            if hypopg is None:
                for relname in set(_seq_scanned(baseline)):
                    t = next((t for t in item.tables.values() if t.name == relname), None)
                    if t is not None and t.rows >= min_table_rows and t.seq_tup_read >= t.idx_tup_fetch:
                        ev = scans.setdefault(t.oid, SeqScanEvidence(
                            datname, t.schema, t.name, t.rows, t.seq_scan, t.idx_scan))
                        ev.statements.append(st)
                continue
            columns = {ref: set(t.columns) for ref, t in item.tables.items()}
            tried: list[tuple[Table, tuple[str, ...], float]] = []
            for ref, use in resolve(item.shape, columns).items():
                t = item.tables[ref]
                if t.rows < min_table_rows:
                    continue
                for key in candidate_keys(use):
                    if _covered(key, keys_by_table.get(t.oid, [])):
                        continue
                    oid = await planner.hypothetical(t, [quote_ident(c) for c in key])
                    try:
                        after = await planner.cost(st.query, item.shape.params)
                    finally:
                        await planner.drop(oid)
                    tried.append((t, key, after))
            best = _best(tried, before)
            if best is not None and 1 - best[2] / before >= min_saving:
                advised.append((best[0], best[1], StatementAdvice(st, before, best[2])))
        out.advice = merge_advice(datname, advised)
        out.evidence = sorted(scans.values(), key=lambda e: -e.time_share)
    finally:
        await planner.reset()
    return out


# Keys whose savings are this close (share of the statement's cost) count as equal: the one
# with the fewest columns wins (a smaller index, and one more statements can share).
SAVING_TIE = 0.02


def _best(
    tried: Sequence[tuple[Table, tuple[str, ...], float]], before: float
) -> tuple[Table, tuple[str, ...], float] | None:
    if not tried or before <= 0:
        return None
    top = max(1 - after / before for _, _, after in tried)
    close = [c for c in tried if 1 - c[2] / before >= top - SAVING_TIE]
    return min(close, key=lambda c: (len(c[1]), c[2]))


def merge_advice(
    datname: str, advised: Sequence[tuple[Table, tuple[str, ...], StatementAdvice]]
) -> list[Advice]:
    """One advice per (table, key); a key that is a leading prefix of another on the same table
    is served by the wider one, so its statements move there. Best first."""
    by_key: dict[tuple[int, tuple[str, ...]], Advice] = {}
    for t, key, sa in advised:
        adv = by_key.setdefault((t.oid, key), Advice(datname, t.schema, t.name, key))
        adv.statements.append(sa)
    for (oid, key), adv in sorted(by_key.items(), key=lambda kv: len(kv[0][1])):
        wider = [a for (o, k), a in by_key.items() if o == oid and len(k) > len(key) and k[: len(key)] == key]
        if wider:
            target = max(wider, key=lambda a: (len(a.statements), a.label))
            target.statements.extend(adv.statements)
            adv.statements = []
    merged = [a for a in by_key.values() if a.statements]
    return sorted(merged, key=lambda a: (-(a.saving * a.time_share), a.schema, a.table, a.label))


async def _table(conn: AsyncConnection, ref: TableRef) -> Table | None:
    name = f"{quote_ident(ref.schema)}.{quote_ident(ref.name)}" if ref.schema else quote_ident(ref.name)
    r = (await conn.execute(text(TABLES_SQL), {"name": name})).mappings().first()
    if r is None:
        return None
    return Table(int(r["oid"]), r["schema"], r["name"], frozenset(r["columns"]), float(r["rows"]),
                 int(r["seq_scan"]), int(r["idx_scan"]), int(r["seq_tup_read"]), int(r["idx_tup_fetch"]))


def _existing_keys(indexes: dict[int, list[ExistingIndex]]) -> dict[int, list[tuple[str | None, ...]]]:
    out: dict[int, list[tuple[str | None, ...]]] = {}
    for relid, group in indexes.items():
        for ix in group:
            if ix.amname == "btree":
                out.setdefault(relid, []).append(ix.columns)
                if ix.predicate:
                    fixed = [c for c in predicate_columns(ix.predicate) if c not in ix.columns]
                    out[relid].append((*fixed, *ix.columns))
    return out


async def _twins(
    planner: Planner, tables: dict[int, Table], indexes: dict[int, list[ExistingIndex]]
) -> dict[int, list[tuple[str | None, ...]]]:
    """Hypothetical predicate-free twins of the partial btree indexes (see the module's doc)."""
    keys = _existing_keys(indexes)
    for relid, group in indexes.items():
        t = tables.get(relid)
        if t is None:
            continue
        for ix in group:
            if ix.amname != "btree" or not ix.predicate:
                continue
            fixed = [c for c in predicate_columns(ix.predicate) if c not in ix.columns]
            try:
                await planner.hypothetical(t, [*(quote_ident(c) for c in fixed), *ix.key_defs])
            except Exception as e:  # an expression HypoPG cannot take: the statement pays for it
                log.debug("advisor: no hypothetical twin for index %s: %s", ix.name, _one_line(e))
    return keys


def _one_line(e: BaseException) -> str:
    msg = str(getattr(e, "args", [e])[0] if getattr(e, "args", None) else e)
    return " ".join(msg.split())[:300]
