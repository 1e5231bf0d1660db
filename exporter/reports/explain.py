"""`explain`: EXPLAIN a statement the way the seed design's QueryOptimizer meant to, without ever
changing data, and point at the plan nodes that dominate.

- Without --analyze: EXPLAIN (FORMAT JSON); nothing is executed (any explainable statement).
- With --analyze: EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) in a READ ONLY transaction under a
  statement_timeout, rolled back. A statement that writes, seen in its text, is refused unless
  --allow-writes; one whose write only shows at run time (a function that writes, nextval) fails
  on the read-only transaction. With --allow-writes it runs READ WRITE and is still rolled back
  (sequences advanced by nextval are the one thing a rollback does not undo).
- Parameters: a JSON array bound to $1..$n (the placeholders pg_stat_statements shows), or a
  JSON object for seed-style `:name` parameters, via PREPARE and EXPLAIN EXECUTE with literals,
  so the server converts each value to the parameter's type and the plan is the custom plan the
  application gets.
- Findings say why an existing index is not used when the statement could be written so it is:
  an ORDER BY or WHERE expression that is not the expression index's expression, `IS TRUE/FALSE`
  where a partial index's predicate says `= true/false`, a column wrapped in a function or cast.
  Nodes under a LIMIT stop early by design: they get no row-estimate finding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ..errors import QueryError
from ..postgres.engine import PostgresTarget, describe_error
from .render import Column, format_count, format_ms, render_table
from .statement import Statement
from .targets import ReportInputError, check_database

__all__ = [
    "ExplainReport", "Finding", "IndexInfo", "NodeTime", "analyze_plan", "explain", "explain_text",
    "index_findings",
]

PREPARED_NAME = "pgcache_explain"
ROW_ERROR_FACTOR = 10.0
TOP_NODES = 5
# SQLSTATE classes that mean "the statement as given is wrong" (exit 2), not a server failure.
_INPUT_SQLSTATES = ("42", "22", "0A", "21", "2B", "23", "25006", "44")


@dataclass(frozen=True)
class Finding:
    # seq_scan | row_estimate | sort_spill | hash_spill
    # | expression_mismatch | partial_predicate | index_not_usable (an index the query could use)
    kind: str
    node: str
    detail: str


@dataclass(frozen=True)
class NodeTime:
    node: str
    exclusive_ms: float
    percent: float | None  # of the execution time
    rows: float
    loops: float


@dataclass(frozen=True)
class ExplainReport:
    database: str
    analyze: bool
    read_write: bool
    statement: str
    params: list[Any] | dict[str, Any] | None
    planning_ms: float | None
    execution_ms: float | None
    total_cost: float
    plan_rows: float
    actual_rows: float | None
    shared_hit_blocks: int | None
    shared_read_blocks: int | None
    findings: list[Finding] = field(default_factory=list)
    top_nodes: list[NodeTime] = field(default_factory=list)
    plan: list[Any] = field(default_factory=list)  # the raw FORMAT JSON output


def _label(node: Mapping[str, Any]) -> str:
    out = str(node.get("Node Type", "?"))
    if node.get("Strategy") in ("Sorted", "Hashed", "Mixed") and out == "Aggregate":
        out = f"{node['Strategy']} Aggregate"
    if "Index Name" in node:
        out += f" using {node['Index Name']}"
    if "Relation Name" in node:
        out += f" on {node['Relation Name']}"
        if node.get("Alias") not in (None, node["Relation Name"]):
            out += f" {node['Alias']}"
    elif "CTE Name" in node:
        out += f" on {node['CTE Name']}"
    return out


def _walk(node: Mapping[str, Any], parallel: bool = False) -> Iterator[tuple[Mapping[str, Any], bool]]:
    """Every node, and whether it runs in parallel workers (below a Gather)."""
    yield node, parallel
    below = parallel or node.get("Node Type") in ("Gather", "Gather Merge")
    for child in node.get("Plans", ()):
        yield from _walk(child, below)


def _inclusive_ms(node: Mapping[str, Any], parallel: bool) -> float:
    # Actual Total Time is per loop. Loops in parallel workers run at the same time, so their
    # average is the wall time; elsewhere loops run one after another.
    loops = 1.0 if parallel else float(node.get("Actual Loops", 1) or 0)
    return float(node.get("Actual Total Time", 0.0)) * loops


def _under_limit(node: Mapping[str, Any], below: bool = False) -> Iterator[int]:
    """id() of every node below a Limit (they stop when the Limit has its rows)."""
    if below:
        yield id(node)
    for child in node.get("Plans", ()):
        yield from _under_limit(child, below or node.get("Node Type") == "Limit")


@dataclass(frozen=True)
class IndexInfo:
    """An index on a table the plan reads (from the catalog)."""

    table: str
    name: str
    keys: tuple[str, ...]  # pg_get_indexdef of each key column (an expression or a column name)
    expression: tuple[bool, ...]  # per key: an expression, not a plain column
    predicate: str | None


_CAST = re.compile(r"::(?:[a-z_]+)(?: (?:precision|varying|without time zone|with time zone))?")
_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
_BOOL_TEST = re.compile(r"\(?(?:\w+\.)?(\w+)\)? IS (NOT )?(TRUE|FALSE)")


def _norm(expr: str) -> str:
    """An expression as text without what does not change its meaning for this comparison:
    casts, parentheses, spaces, table qualifiers."""
    e = _CAST.sub("", expr.lower())
    e = re.sub(r"\b[a-z_][a-z0-9_]*\.(?=[a-z_])", "", e)
    return re.sub(r"[()\s]", "", e)


def _idents(expr: str) -> set[str]:
    e = re.sub(r"'[^']*'", "", _CAST.sub("", expr.lower()))
    return set(_IDENT.findall(re.sub(r"\b[a-z_][a-z0-9_]*\.(?=[a-z_])", "", e))) - {
        "and", "or", "not", "is", "true", "false", "null", "desc", "asc", "nulls", "first", "last"}


def index_findings(root: Mapping[str, Any], indexes: Sequence[IndexInfo]) -> list[Finding]:
    """Where an existing index would serve if the statement were written differently."""
    findings: list[Finding] = []
    seen: set[tuple[str, str, str]] = set()

    def add(kind: str, node: str, detail: str, index: str) -> None:
        if (kind, node, index) not in seen:
            seen.add((kind, node, index))
            findings.append(Finding(kind, node, detail))

    tables = {n["Relation Name"] for n, _ in _walk(root) if "Relation Name" in n}
    expr_keys = [(ix, k) for ix in indexes if ix.table in tables
                 for k, is_expr in zip(ix.keys, ix.expression, strict=False) if is_expr]
    for node, _ in _walk(root):
        label = _label(node)
        texts: list[tuple[str, str]] = [("ORDER BY", k) for k in node.get("Sort Key", ())]
        table = node.get("Relation Name")
        if "Filter" in node:
            texts.append(("WHERE", str(node["Filter"])))
        for where, t in texts:
            for ix, key in expr_keys:
                if where == "WHERE" and ix.table != table:
                    continue
                if _idents(key) and _idents(key) <= _idents(t) and _norm(key) not in _norm(t):
                    add("expression_mismatch", label,
                        f"{where} {t} is not the expression of index {ix.name} ({key}): write it "
                        "exactly as the index does (same operators and constants, sent as SQL, "
                        "not as parameters), or the index cannot serve it", ix.name)
        if table is None or "Filter" not in node:
            continue
        filt = str(node["Filter"])
        for ix in indexes:
            if ix.table != table:
                continue
            if ix.predicate:
                pred_cols = _idents(ix.predicate)
                for m in _BOOL_TEST.finditer(filt):
                    col, neg, val = m.group(1), m.group(2), m.group(3)
                    if col.lower() in pred_cols:
                        truth = (val == "TRUE") != bool(neg)
                        add("partial_predicate", label,
                            f"{m.group(0).strip('()')} keeps the partial index {ix.name} (WHERE "
                            f"{ix.predicate}) from being used: PostgreSQL proves the predicate "
                            f"from {col} = {str(truth).lower()}, not from IS {neg or ''}{val}; "
                            f"write {col} = {str(truth).lower()} (SQLAlchemy: == {truth}() rather "
                            f"than .is_({truth}))", ix.name)
            if node.get("Node Type") == "Seq Scan" and ix.keys and not ix.expression[0]:
                col = re.escape(ix.keys[0].strip('"'))
                # Casts are left out: PostgreSQL shows `(status)::text` for a varchar column its
                # index serves all the same.
                wrapped = re.search(rf"\w+\(\(?(?:\w+\.)?{col}\b", filt)
                if wrapped and not ix.predicate:
                    add("index_not_usable", label,
                        f"index {ix.name} on ({ix.keys[0]}) cannot serve the filter {filt}: the column "
                        "is inside a function; compare the bare column to a value of its "
                        "type (or index the expression)", ix.name)
    return findings


def analyze_plan(
    plan: Mapping[str, Any], *, analyzed: bool, table_rows: Mapping[str, float], seq_scan_rows: float,
    indexes: Sequence[IndexInfo] = (),
) -> tuple[list[Finding], list[NodeTime]]:
    """The nodes that dominate: sequential scans of large tables, row estimates off by 10x or more
    (not under a LIMIT), sorts and hashes spilling to disk, indexes the statement could use if
    written differently; and (analyzed) the top nodes by exclusive time."""
    root = plan["Plan"]
    execution = plan.get("Execution Time")
    findings: list[Finding] = []
    times: list[NodeTime] = []
    limited = set(_under_limit(root))
    for node, parallel in _walk(root):
        label = _label(node)
        loops = float(node.get("Actual Loops", 0) or 0)
        if node.get("Node Type") == "Seq Scan":
            in_table = table_rows.get(str(node.get("Relation Name")))
            if analyzed:
                examined = (float(node.get("Actual Rows", 0)) + float(node.get("Rows Removed by Filter", 0))) * loops
                returned = float(node.get("Actual Rows", 0)) * loops
            else:
                examined = returned = float(node.get("Plan Rows", 0))
            if max(in_table or 0.0, examined) >= seq_scan_rows:
                detail = (
                    f"{format_count(in_table)} rows in the table (estimate), "
                    f"{format_count(examined)} read, {format_count(returned)} returned"
                    + (f"; filter {node['Filter']}: an index on it may help" if "Filter" in node else "")
                )
                findings.append(Finding("seq_scan", label, detail))
        if analyzed and loops > 0 and id(node) not in limited:
            est, act = float(node.get("Plan Rows", 0)), float(node.get("Actual Rows", 0))
            ratio = max(est, 1.0) / max(act, 1.0)
            if ratio >= ROW_ERROR_FACTOR or 1 / ratio >= ROW_ERROR_FACTOR:
                way = "over" if ratio > 1 else "under"
                findings.append(Finding(
                    "row_estimate", label,
                    f"estimated {format_count(est)} rows, actual {format_count(act)} per loop "
                    f"({max(ratio, 1 / ratio):,.0f}x {way}-estimate): ANALYZE the table, or raise "
                    "its statistics target",
                ))
        if node.get("Sort Space Type") == "Disk" or str(node.get("Sort Method", "")).startswith("external"):
            findings.append(Finding(
                "sort_spill", label,
                f"{node.get('Sort Method')} using {format_count(node.get('Sort Space Used'))} kB on "
                "disk: raise work_mem for this query, or sort fewer rows",
            ))
        if int(node.get("Hash Batches", 1) or 1) > 1:
            findings.append(Finding(
                "hash_spill", label,
                f"{node['Hash Batches']} batches (spilled to disk), peak memory "
                f"{format_count(node.get('Peak Memory Usage'))} kB: raise work_mem or hash_mem_multiplier",
            ))
        if analyzed and loops > 0:
            below = parallel or node.get("Node Type") in ("Gather", "Gather Merge")
            own = _inclusive_ms(node, parallel) - sum(_inclusive_ms(c, below) for c in node.get("Plans", ()))
            own = max(0.0, own)
            pct = 100 * own / execution if execution else None
            times.append(NodeTime(label, own, pct, float(node.get("Actual Rows", 0)), loops))
    findings += index_findings(root, indexes)
    times.sort(key=lambda t: -t.exclusive_ms)
    return findings, times[:TOP_NODES]


INDEXES_SQL = """
SELECT c.relname AS "table", ic.relname AS name, pg_get_expr(i.indpred, i.indrelid) AS predicate,
       ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true)
             FROM generate_series(1, i.indnkeyatts) k)::text[] AS keys,
       ARRAY(SELECT k.attnum = 0 FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)::bool[] AS expression
FROM unnest(CAST(:names AS text[])) n
JOIN pg_class c ON c.oid = to_regclass(quote_ident(n))
JOIN pg_index i ON i.indrelid = c.oid JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indisvalid
ORDER BY 1, 2
"""


def _sqlstate(e: DBAPIError) -> str:
    orig = e.orig
    return str(getattr(getattr(orig, "__cause__", None), "sqlstate", None) or getattr(orig, "sqlstate", "") or "")


async def explain(
    target: PostgresTarget,
    statement: Statement,
    *,
    params: list[str] | None,
    raw_params: list[Any] | dict[str, Any] | None,
    analyze: bool,
    allow_writes: bool,
    database: str | None,
    statement_timeout: float,
    seq_scan_rows: float,
) -> ExplainReport:
    if analyze and statement.writes and not allow_writes:
        raise ReportInputError(
            f"refused: EXPLAIN ANALYZE executes the statement and it would write ({statement.writes}). "
            "Rerun with --allow-writes to run it in a transaction that is rolled back, or without "
            "--analyze to see the plan without running it"
        )
    db = database or target.default_database
    if database is not None:
        await check_database(target, database, statement_timeout)
    read_write = analyze and allow_writes
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    where = f"target {target.name}, database {db}"
    async with target.session(db, statement_timeout=statement_timeout, read_write=read_write) as conn:
        try:
            # exec_driver_sql: the text reaches the server as written (no ':name' binds).
            if params is None:
                result = await conn.exec_driver_sql(f"EXPLAIN ({options}) {statement.text}")
            else:
                await conn.exec_driver_sql(f"PREPARE {PREPARED_NAME} AS {statement.text}")
                result = await conn.exec_driver_sql(
                    f"EXPLAIN ({options}) EXECUTE {PREPARED_NAME}({', '.join(params)})"
                )
            raw = result.scalar_one()
            doc: list[Any] = json.loads(raw) if isinstance(raw, str) else raw
            if params is not None:
                await conn.exec_driver_sql(f"DEALLOCATE {PREPARED_NAME}")
            names = sorted({str(n["Relation Name"]) for n, _ in _walk(doc[0]["Plan"])
                            if n.get("Node Type") == "Seq Scan" and "Relation Name" in n})
            table_rows: dict[str, float] = {}
            if names:
                found = await conn.execute(text(
                    "SELECT n, c.reltuples::float8 FROM unnest(CAST(:names AS text[])) n "
                    "JOIN pg_class c ON c.oid = to_regclass(quote_ident(n))"
                ), {"names": names})
                table_rows = {n: max(0.0, r) for n, r in found}
            scanned = sorted({str(n["Relation Name"]) for n, _ in _walk(doc[0]["Plan"]) if "Relation Name" in n})
            indexes: list[IndexInfo] = []
            if scanned:
                rows = await conn.execute(text(INDEXES_SQL), {"names": scanned})
                indexes = [IndexInfo(r.table, r.name, tuple(r.keys), tuple(r.expression), r.predicate)
                           for r in rows]
        except DBAPIError as e:
            state = _sqlstate(e)
            if state == "25006":
                raise ReportInputError(
                    f"{where}: refused at run time, the statement tried to write "
                    f"({describe_error(e)}); nothing was changed. Rerun with --allow-writes to run "
                    "it in a transaction that is rolled back"
                ) from None
            if state == "57014":
                raise QueryError(f"{where}: the statement ran longer than --timeout {statement_timeout:g}s and was cancelled") from None
            if state.startswith(_INPUT_SQLSTATES):
                raise ReportInputError(f"{where}: {describe_error(e)}") from None
            raise  # the session names it (connection lost, or a server-side failure)
        finally:
            # Always: whatever ran is undone (the session would roll back too; say it here).
            await conn.rollback()

    top = doc[0]
    root = top["Plan"]
    findings, nodes = analyze_plan(top, analyzed=analyze, table_rows=table_rows,
                                   seq_scan_rows=seq_scan_rows, indexes=indexes)
    return ExplainReport(
        database=db, analyze=analyze, read_write=read_write, statement=statement.text,
        params=raw_params,
        planning_ms=top.get("Planning Time"), execution_ms=top.get("Execution Time"),
        total_cost=float(root["Total Cost"]), plan_rows=float(root["Plan Rows"]),
        actual_rows=float(root["Actual Rows"]) if "Actual Rows" in root else None,
        shared_hit_blocks=root.get("Shared Hit Blocks"), shared_read_blocks=root.get("Shared Read Blocks"),
        findings=findings, top_nodes=nodes, plan=doc,
    )


def explain_text(r: ExplainReport, width: int | None = None) -> str:
    if r.analyze:
        how = ("executed in a READ WRITE transaction, rolled back (sequences advanced by nextval "
               "stay advanced)" if r.read_write else "executed in a read-only transaction, rolled back")
    else:
        how = "planned only, not executed"
    out = [f"EXPLAIN{' ANALYZE' if r.analyze else ''} on database {r.database}: {how}\n"]
    facts = [f"planning {format_ms(r.planning_ms)}"]
    if r.analyze:
        facts.append(f"execution {format_ms(r.execution_ms)}")
    facts.append(f"total cost {r.total_cost:,.2f}")
    if r.actual_rows is not None:
        facts.append(f"rows {format_count(r.actual_rows)} (estimated {format_count(r.plan_rows)})")
    else:
        facts.append(f"rows {format_count(r.plan_rows)} (estimated)")
    if r.shared_hit_blocks is not None:
        facts.append(f"shared buffers hit {format_count(r.shared_hit_blocks)}, "
                     f"read {format_count(r.shared_read_blocks)}")
    out.append(" · ".join(facts) + "\n")
    if r.findings:
        out.append("\nFindings:\n" + render_table(r.findings, [
            Column("KIND", lambda f: f.kind),
            Column("NODE", lambda f: f.node, flex=True, min_width=16),
            Column("DETAIL", lambda f: f.detail, flex=True, min_width=30),
        ], width))
    else:
        out.append("\nFindings: none (no large sequential scan, 10x row-estimate error, spill, or "
                   "index the statement could use if written differently)\n")
    if r.top_nodes:
        out.append("\nTop nodes by exclusive time:\n" + render_table(r.top_nodes, [
            Column("TIME", lambda t: format_ms(t.exclusive_ms), ">"),
            Column("%", lambda t: "-" if t.percent is None else f"{t.percent:.0f}", ">"),
            Column("ROWS", lambda t: format_count(t.rows), ">"),
            Column("LOOPS", lambda t: format_count(t.loops), ">"),
            Column("NODE", lambda t: t.node, flex=True, min_width=16),
        ], width))
    return "".join(out)
