"""`report missing-indexes`: what the advisor collector finds, for a person: the CREATE INDEX
CONCURRENTLY statements to review, the statements each would help (text, calls, mean time), the
planner's cost before and after (with a hypothetical index), and why. It creates nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..advisor.collector import AdvisorCollector
from ..advisor.settings import AdvisorSettings
from ..postgres.engine import PostgresTarget
from .render import format_count, format_ms, one_line

__all__ = ["MissingIndexes", "missing_indexes", "missing_indexes_text"]

QUERY_WIDTH = 160


@dataclass
class MissingIndexes:
    databases: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def missing_indexes(
    target: PostgresTarget, settings: AdvisorSettings, *, database: str | None
) -> MissingIndexes:
    from ..advisor.planner import DatabaseAdvice  # pglast loads with it

    collector = AdvisorCollector(target, settings)
    results, failures = await collector.advise(database)
    report = MissingIndexes(errors=failures)

    def statement(st: Any) -> dict[str, Any]:
        return {"queryid": st.queryid, "query": st.query, "calls": st.calls,
                "mean_ms": round(st.mean_ms, 3), "total_ms": round(st.total_ms, 3)}

    r: DatabaseAdvice
    for r in results:
        report.databases.append({
            "datname": r.datname,
            "hypopg": r.hypopg,
            "statements_planned": r.planned,
            "advice": [{
                "schema": a.schema, "table": a.table, "columns": list(a.columns), "index": a.label,
                "definition": a.definition + ";",
                "saving": round(a.saving, 4), "statement_time_share": round(a.time_share, 4),
                "why": (f"planned with a hypothetical index, it cuts the estimated cost of "
                        f"{len(a.statements)} statement(s) by {a.saving:.0%}; they take "
                        f"{a.time_share:.0%} of the database's statement time"),
                "statements": [{**statement(s.statement), "cost_before": round(s.cost_before, 2),
                                "cost_after": round(s.cost_after, 2), "saving": round(s.saving, 4)}
                               for s in a.statements],
            } for a in r.advice[: settings.limit]],
            "seq_scan_evidence": [{
                "schema": e.schema, "table": e.table, "rows": int(e.rows), "seq_scans": e.seq_scan,
                "index_scans": e.idx_scan, "statement_time_share": round(e.time_share, 4),
                "statements": [statement(s) for s in e.statements],
            } for e in r.evidence[: settings.limit]],
            "unplannable": [{"queryid": st.queryid, "reason": why} for st, why in r.unplannable],
        })
    return report


def missing_indexes_text(report: MissingIndexes) -> str:
    out: list[str] = []
    for db in report.databases:
        out.append(f"database {db['datname']}: {db['statements_planned']} top statement(s) planned"
                   + ("" if db["hypopg"] else " (HypoPG is missing: evidence only, nothing proven)"))
        if db["hypopg"] and not db["advice"]:
            out.append("  no missing index found")
        for a in db["advice"]:
            out.append(f"  {a['definition']}")
            out.append(f"    why: {a['why']}")
            for s in a["statements"]:
                out.append(f"    - cost {s['cost_before']:,.0f} -> {s['cost_after']:,.0f}, "
                           f"{format_count(s['calls'])} calls, mean {format_ms(s['mean_ms'])}: "
                           f"{one_line(s['query'])[:QUERY_WIDTH]}")
        for e in db["seq_scan_evidence"]:
            out.append(f"  {e['schema']}.{e['table']}: ~{format_count(e['rows'])} rows, "
                       f"{format_count(e['seq_scans'])} sequential scans against "
                       f"{format_count(e['index_scans'])} index scans; read sequentially by:")
            for s in e["statements"]:
                out.append(f"    - {format_count(s['calls'])} calls, mean {format_ms(s['mean_ms'])}: "
                           f"{one_line(s['query'])[:QUERY_WIDTH]}")
        if db["unplannable"]:
            out.append(f"  {len(db['unplannable'])} statement(s) could not be planned (first: "
                       f"{db['unplannable'][0]['reason']})")
    for e in report.errors:
        out.append(f"error: {e}")
    if not report.databases and not report.errors:
        out.append("no statements to plan yet (pg_stat_statements has none for the watched databases)")
    return "\n".join(out) + "\n"
